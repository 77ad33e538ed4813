"""Type-check the whole `genloom` package, the SDK (sdk/genloom) and the servers (services/) together.

The installed package maps two source folders onto one import name: `genloom` is sdk/genloom and
`genloom.services` is services/. mypy finds modules by folder, so it cannot follow that mapping by itself; this
script lays out build/typecheck/genloom as symlinks (sdk/genloom's entries plus `services`), runs mypy on
`-p genloom` there with pyproject.toml's settings, and prints each error under its path in the repository.

    python scripts/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def lay_out() -> Path:
    """build/typecheck/genloom: a symlink per entry of sdk/genloom, and services -> services/."""
    package = TREE / "genloom"
    package.mkdir(parents=True, exist_ok=True)
    wanted = {entry.name: entry for entry in (ROOT / "sdk" / "genloom").iterdir() if entry.name != "__pycache__"}
    wanted["services"] = ROOT / "services"
    for link in package.iterdir():
        if link.name not in wanted or not link.is_symlink() or link.resolve() != wanted[link.name].resolve():
            link.unlink()
    for name, target in wanted.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(target)
    return package


def main(argv: list[str]) -> int:
    lay_out()
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "genloom", *argv]
    run = subprocess.run(command, cwd=TREE, capture_output=True, text=True, env={**os.environ, "MYPYPATH": ""})
    # Errors name the laid-out paths; show the repository's own.
    for stream, text in ((sys.stdout, run.stdout), (sys.stderr, run.stderr)):
        text = text.replace("genloom/services/", "services/")
        stream.write("\n".join(line if not line.startswith("genloom/") else "sdk/" + line for line in text.split("\n")))
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
