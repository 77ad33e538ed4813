"""The generated protobuf/gRPC stubs (sdk/genloom/v1, git-ignored) import with the GPU machine's protobuf and
grpcio: CUDA images bring their own, which may be older than the versions the stubs were generated for."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from .rig import Figures

pytestmark = pytest.mark.gpu

STUBS = Path(__file__).resolve().parents[2] / "sdk" / "genloom" / "v1"


def _generated_version(pattern: str, files: list[Path]) -> str | None:
    for f in files[:1]:
        found = re.search(pattern, f.read_text())
        return found.group(1) if found else None
    return None


def test_protobuf_stubs_import(figures: Figures) -> None:
    messages = sorted(STUBS.glob("*_pb2.py"))
    if not messages:
        pytest.skip("sdk/genloom/v1 has no generated stubs (make protos, or carry them to this machine)")
    import google.protobuf
    import grpc

    failed: dict[str, str] = {}
    stubs = sorted(p.stem for p in STUBS.glob("*_pb2*.py"))
    for name in stubs:
        try:
            importlib.import_module(f"genloom.v1.{name}")
        except Exception as exc:
            failed[name] = repr(exc)[:300]
    figures.record(
        "protobuf_stubs_import",
        stubs=len(stubs),
        stubs_gencode_protobuf=_generated_version(r"Protobuf Python Version: (\S+)", messages),
        stubs_grpc_generated=_generated_version(
            r"GRPC_GENERATED_VERSION = '([^']+)'", sorted(STUBS.glob("*_pb2_grpc.py"))
        ),
        protobuf=google.protobuf.__version__,
        grpcio=grpc.__version__,
        failed=failed,
    )
    assert not failed, f"stubs that do not import with protobuf {google.protobuf.__version__}: {failed}"
