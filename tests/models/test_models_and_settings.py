"""Model resolution (the default model's one-time conversion included) and typed settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genloom.services.launch import SETTINGS_CLASSES
from genloom.services.models.registry import ModelRegistry
from genloom.services.models.smollm2 import COMPLETE_MARKER
from genloom.services.server.errors import NotFound
from genloom.services.server.settings import ModelSettings, ServerSettings, SettingsError

CONVERT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from genloom.services.models.smollm2 import ensure_default_model
print(ensure_default_model(Path(sys.argv[1]), "smollm2-135m-instruct"))
"""


@pytest.mark.slow
def test_default_model_converts_once_when_two_processes_race(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # A directory left by a conversion that crashed half way (no completion marker) is replaced.
    (cache / "smollm2-135m-instruct").mkdir(parents=True)
    (cache / "smollm2-135m-instruct" / "model.safetensors").write_text("truncated")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert paths == {str(cache / "smollm2-135m-instruct")}
    assert sum("converting" in err for _, err in outputs) == 1  # the second process waited and reused it
    model_dir = cache / "smollm2-135m-instruct"
    assert (model_dir / COMPLETE_MARKER).is_file()
    assert {"config.json", "tokenizer.json", "model.safetensors", "chat_template.jinja"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert (model_dir / "model.safetensors").stat().st_size > 100_000_000  # fp32 weights, not the stub
    # Readable by every user: an image converts the model as root and serves it as an unprivileged user.
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in model_dir.iterdir()), [
        (p.name, oct(p.stat().st_mode)) for p in model_dir.iterdir()
    ]
    assert not [p for p in cache.iterdir() if p.name.startswith(".smollm2-135m-instruct-")]  # no staging left


def test_registry_resolves_aliases_and_refuses_the_rest(default_model_dir: Path, small_model_dir: Path) -> None:
    settings = ModelSettings(model_cache=default_model_dir.parent, models=f"small={small_model_dir},{small_model_dir}")
    registry = ModelRegistry(settings)
    assert registry.configured_names() == ["smollm2-135m-instruct", "small", small_model_dir.name]
    assert registry.resolve("").path == default_model_dir
    assert registry.resolve("small").path == small_model_dir
    assert registry.resolve(small_model_dir.name).path == small_model_dir
    with pytest.raises(NotFound, match="known models: small"):
        registry.resolve("gpt-5")
    # Model paths are off by default (tests/models/test_model_paths.py has them on): a path is an unknown name.
    for path in (str(small_model_dir), "/etc", "/" + "a" * 300):
        with pytest.raises(NotFound, match="GENLOOM_ALLOW_MODEL_PATHS is off"):
            registry.resolve(path)


def test_settings_from_env_with_types_and_overrides(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("b\n# comment\nc\n")
    settings = ServerSettings.from_env(
        {
            "GENLOOM_PORT": "6000",
            "GENLOOM_SHUTDOWN_GRACE": "2.5",
            "GENLOOM_API_KEYS": "a, b",
            "GENLOOM_API_KEYS_FILE": str(keys),
            "GENLOOM_LOG_FORMAT": "json",
        },
        host="0.0.0.0",
    )
    assert (settings.host, settings.port, settings.shutdown_grace, settings.log_format) == (
        "0.0.0.0",
        6000,
        2.5,
        "json",
    )
    assert settings.load_api_keys() == {"a", "b", "c"}
    assert ModelSettings.from_env({}).allow_model_paths is False  # a safe default: the configured models only
    assert ModelSettings.from_env({"GENLOOM_ALLOW_MODEL_PATHS": "on"}).allow_model_paths is True
    assert ServerSettings.from_env({}).host == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"GENLOOM_PORT": "fifty"}, "GENLOOM_PORT='fifty'"),
        ({"GENLOOM_PORT": "99999"}, "GENLOOM_PORT"),
        ({"GENLOOM_LOG_FORMAT": "xml"}, "GENLOOM_LOG_FORMAT"),
        ({"GENLOOM_TLS_CERT": "/nonexistent.pem"}, "GENLOOM_TLS_KEY"),
        ({"GENLOOM_METRICS_PORT": "-5"}, "GENLOOM_METRICS_PORT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        ServerSettings.from_env(env)


def test_every_setting_has_env_var_flag_default_and_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "genloom.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},
    )
    assert result.returncode == 0
    seen = set()
    names = set()
    for cls in SETTINGS_CLASSES:
        for info in cls.fields():
            assert info.env.startswith("GENLOOM_") and info.env not in seen
            assert info.name not in names, f"{info.name} is declared twice: CLI parameters would collide"
            seen.add(info.env)
            names.add(info.name)
            assert info.help.strip(), info.name
            assert info.flag in result.stdout and info.env in result.stdout, info.env
