"""The images' build step without Docker: the files the Dockerfiles COPY (the root .dockerignore applied, so no
developer stubs) built into a wheel the way `pip install .` / `pip wheel .` do in the images. The wheel must carry
stubs generated from protos/ and the health probe, and run from itself (not from this checkout)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ("pyproject.toml", "setup.py", "README.md", "protos", "sdk", "services")


def _excluded(relative: str, patterns: list[str]) -> bool:
    """Docker's rule for the patterns used here: a path is excluded when it or a folder above it matches."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _build_context(dest: Path) -> None:
    """Copy what Dockerfile.cpu COPYs, minus the exclusions .dockerignore lists after its allow-list."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith(("#", "!")) and line != "*"]
    for name in CONTEXT:
        source = ROOT / name
        if source.is_file():
            shutil.copy2(source, dest / name)
            continue
        for path in source.rglob("*"):
            relative = str(path.relative_to(ROOT))
            if path.is_dir() or _excluded(relative, patterns):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def test_wheel_from_the_build_context_has_generated_stubs_and_the_probe(tmp_path: Path) -> None:
    context, out, unpacked = tmp_path / "context", tmp_path / "wheels", tmp_path / "site"
    context.mkdir()
    _build_context(context)
    assert not list((context / "sdk" / "genloom" / "v1").glob("*_pb2*.py")), "the context must not carry stubs"

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("genloom-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(unpacked)
    for service in ("tokenizer", "inference", "tasks", "finetune"):
        assert f"genloom/v1/{service}_pb2.py" in names and f"genloom/v1/{service}_pb2_grpc.py" in names
    assert "genloom/services/server/probe.py" in names
    assert "genloom/cli/__init__.py" in names

    # Imported from the wheel's files, ahead of this checkout's editable install.
    check = (
        "import genloom, genloom.v1.tasks_pb2_grpc, genloom.services.server.probe as p, genloom.services.launch; "
        f"assert genloom.__file__.startswith({str(unpacked)!r}), genloom.__file__; "
        f"assert p.__file__.startswith({str(unpacked)!r}), p.__file__"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(unpacked)}
    )
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [sys.executable, "-m", "genloom.services.server.probe", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(unpacked)},
    )
    assert probe.returncode == 0 and "SERVING" in probe.stdout
