"""Fixtures of the GPU tests (`pytest -m gpu`): the hf engine and a LoRA fine-tune on CUDA, in bfloat16.

Every test here is marked `gpu` and skipped unless torch sees a CUDA device (the session fixture `device`, autouse,
skips before anything is built), so the default run only reports them skipped. GENLOOM_GPU_TESTS_DEVICE picks
the device (default `cuda`; `cpu` is a dry run of the same checks, smaller and in float32) and
GENLOOM_GPU_TESTS_DTYPE the dtype (default bfloat16 on CUDA, float32 elsewhere).

Nothing is downloaded: the tests build a tiny random Llama with a tokenizer trained here. The tests are plain
functions that drive the engine on one event loop of their own (no pytest-asyncio needed), and this conftest
imports nothing from tests/conftest.py, so bare CUDA images can run them with `--confcutdir tests/gpu`
(scripts/gpu_check.sh). The figures the checks measure (throughput, memory, agreement) are printed at the end of
the run, and written as JSON to the file GENLOOM_GPU_REPORT names, if set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
):
    os.environ.setdefault(_name, _value)

torch = pytest.importorskip("torch")  # after the environment above, which transformers reads on import

from .rig import PROMPT_TEXTS, Figures, Rig, Sizes, build_model_dir, load_model  # noqa: E402

DEVICE_ENV = "GENLOOM_GPU_TESTS_DEVICE"
DTYPE_ENV = "GENLOOM_GPU_TESTS_DTYPE"
REPORT_ENV = "GENLOOM_GPU_REPORT"
FIGURES = pytest.StashKey[Figures]()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="session", autouse=True)
def device() -> torch.device:
    """The device the checks run on; skips every test here when it is CUDA and torch sees none."""
    chosen = torch.device(os.environ.get(DEVICE_ENV) or "cuda")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"needs a CUDA device: torch.cuda.is_available() is False ({DEVICE_ENV}=cpu: a CPU dry run)")
        if chosen.index is None:
            chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


@pytest.fixture(scope="session")
def dtype_name(device: torch.device) -> str:
    name = os.environ.get(DTYPE_ENV) or ("bfloat16" if device.type == "cuda" else "float32")
    if name not in ("float32", "bfloat16", "float16"):
        pytest.fail(f"{DTYPE_ENV}={name}: use float32, bfloat16 or float16", pytrace=False)
    return name


@pytest.fixture(scope="session")
def sizes(device: torch.device) -> Sizes:
    return Sizes.full() if device.type == "cuda" else Sizes.quick()


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config, device: torch.device, dtype_name: str) -> Figures:
    """The run's figures, starting with what it ran on; printed by pytest_terminal_summary below."""
    figures = pytestconfig.stash.setdefault(FIGURES, Figures())
    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("transformers", "peft", "accelerate", "tokenizers", "grpcio", "protobuf")},
        "device": str(device),
        "dtype": dtype_name,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["cpu_threads"] = torch.get_num_threads()
    figures.record("environment", **env)
    return figures


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop every engine call of the session runs on (the engine answers on the loop of each request)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


@pytest.fixture(scope="session")
def rig(
    device: torch.device,
    dtype_name: str,
    sizes: Sizes,
    figures: Figures,
    loop: asyncio.AbstractEventLoop,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    """The tiny model, built here, in a started HFEngine and in transformers, on the device in the run's dtype."""
    from transformers import AutoTokenizer

    from genloom.services.inference.engines.hf import HFEngine
    from genloom.services.inference.settings import InferenceSettings

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    started = time.perf_counter()
    model_info = build_model_dir(model_dir, sizes)
    model_info["build_s"] = round(time.perf_counter() - started, 2)
    figures.record("model", **model_info)

    dtype: torch.dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = load_model(model_dir, dtype, device)
    settings = InferenceSettings(
        engine="hf", device=str(device), dtype=dtype_name, max_batch_size=32, max_loras=2, max_lora_rank=64
    )
    engine = HFEngine(model_dir, "tiny-llama", settings)
    started = time.perf_counter()
    loop.run_until_complete(engine.start())
    info = {k: str(v) for k, v in dataclasses.asdict(engine.info()).items()}
    figures.record("engine", **info, start_s=round(time.perf_counter() - started, 2))

    prompts = [list(tokenizer(text)["input_ids"]) for text in PROMPT_TEXTS]
    yield Rig(
        loop=loop,
        device=device,
        dtype=dtype,
        sizes=sizes,
        settings=settings,
        model_dir=model_dir,
        model_info=model_info,
        tokenizer=tokenizer,
        reference=reference,
        engine=engine,
        prompts=prompts,
        new_tokens=[sizes.greedy_tokens + 4 * (i % 4) for i in range(len(prompts))],
    )
    loop.run_until_complete(engine.shutdown())
    del reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def greedy_alone(rig: Rig) -> list[list[int]]:
    """The engine's greedy output for each prompt, one request at a time, before any adapter is loaded."""
    return [rig.generate(rig.request(p, max_new_tokens=n)) for p, n in zip(rig.prompts, rig.new_tokens, strict=True)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if figures is None or not figures.checks:
        return
    terminalreporter.write_sep("=", "genloom GPU figures")
    for line in figures.lines():
        terminalreporter.write_line(line)
    report = os.environ.get(REPORT_ENV)
    if report:
        figures.write(Path(report))
        terminalreporter.write_line(f"figures written to {report}")
