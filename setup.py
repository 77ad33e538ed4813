"""Build hooks: generate the genloom.v1 protobuf and gRPC stubs from protos/ before packaging.

The stubs are build outputs (git-ignored). Packages come from two roots: the client SDK in sdk/ (`genloom`) and
the servers in services/ (`genloom.services`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from setuptools import Command, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
STUB_ROOT = ROOT / "sdk"


def generate_stubs() -> None:
    """Compile every protos/genloom/v1/*.proto into sdk/genloom/v1/*_pb2{,_grpc}.py{,i}."""
    import grpc_tools
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "genloom" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files under protos/genloom/v1")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={STUB_ROOT}",
        f"--pyi_out={STUB_ROOT}",
        f"--grpc_python_out={STUB_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))


class GenerateProtos(Command):
    """`python setup.py protos`: regenerate the stubs in place."""

    description = "generate genloom.v1 stubs from protos/"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


packages = (
    find_packages("sdk") + ["genloom.services"] + [f"genloom.services.{name}" for name in find_packages("services")]
)

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    setup(
        packages=packages,
        package_dir={"genloom": "sdk/genloom", "genloom.services": "services"},
        cmdclass={"build_py": BuildPyWithProtos, "protos": GenerateProtos},
    )
