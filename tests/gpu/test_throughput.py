"""Throughput of the hf engine on the device, one request at a time and at concurrency 16, beside transformers'
own `generate` (one request, and one left-padded static batch): on the tiny model, and on a random model of
SmolLM2-135M's shape (the default model's), whose figures come closer to the real model's."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from .rig import PROMPT_TEXTS, Figures, Rig, build_smollm2_shaped_dir, load_model

if TYPE_CHECKING:
    from genloom.services.inference.engines.hf import HFEngine

pytestmark = pytest.mark.gpu


def measure_throughput(rig: Rig, engine: HFEngine, model: Any, check: str, figures: Figures, **extra: Any) -> None:
    """Tokens per second of `engine` (sequential, then concurrent) and of `model.generate`, recorded as `check`."""
    n = rig.sizes.bench_tokens
    concurrency, sequential = rig.sizes.concurrency, rig.sizes.sequential_requests
    prompts = [rig.prompts[i % len(rig.prompts)] for i in range(concurrency)]

    rig.generate(rig.request(rig.prompts[0], max_new_tokens=16, ignore_eos=True), engine=engine)  # warm
    rig.sync()
    started = time.perf_counter()
    sequential_tokens = sum(
        len(rig.generate(rig.request(p, max_new_tokens=n, ignore_eos=True), engine=engine))
        for p in prompts[:sequential]
    )
    rig.sync()
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    results = rig.gather(
        *(rig.collect(rig.request(p, max_new_tokens=n, ignore_eos=True), engine=engine) for p in prompts)
    )
    rig.sync()
    concurrent_s = time.perf_counter() - started
    concurrent_tokens = sum(len(r) for r in results)
    c1, cn = sequential_tokens / sequential_s, concurrent_tokens / concurrent_s

    # transformers' own generate for context: one request, and one left-padded static batch of the same prompts.
    rig.hf_generate(model, rig.prompts[0], 8)  # warm
    rig.sync()
    started = time.perf_counter()
    single = len(rig.hf_generate(model, rig.prompts[0], n, min_new_tokens=n))
    rig.sync()
    generate_single = single / (time.perf_counter() - started)
    texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(concurrency)]
    batch = rig.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(rig.device)
    batch.pop("token_type_ids", None)
    rig.sync()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=rig.pad_id)
    rig.sync()
    generate_batch = out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]) / (time.perf_counter() - started)
    figures.record(
        check,
        **extra,
        new_tokens_per_request=n,
        c1_requests=sequential,
        c1_tok_s=round(c1, 1),
        concurrency=concurrency,
        concurrent_tok_s=round(cn, 1),
        ratio_vs_sequential=round(cn / c1, 2),
        hf_generate_single_tok_s=round(generate_single, 1),
        hf_generate_static_batch_tok_s=round(generate_batch, 1),
    )
    # With ignore_eos every request runs to its budget, alone or in a batch.
    assert sequential_tokens == n * sequential, f"sequential requests made {sequential_tokens} tokens"
    assert [len(r) for r in results] == [n] * concurrency, f"concurrent requests made {[len(r) for r in results]}"


def test_throughput_tiny(rig: Rig, figures: Figures) -> None:
    measure_throughput(
        rig, rig.engine, rig.reference, "throughput_tiny", figures, model_params=rig.model_info["params"]
    )


def test_throughput_smollm2_135m_shape(rig: Rig, figures: Figures, tmp_path: Path) -> None:
    if rig.device.type != "cuda":
        pytest.skip("a 135M-parameter model's throughput is measured on CUDA only (minutes on a CPU)")
    from genloom.services.inference.engines.hf import HFEngine

    model_dir = tmp_path / "smollm2-shaped"
    started = time.perf_counter()
    info = build_smollm2_shaped_dir(model_dir, rig.model_dir, rig.dtype, rig.device)
    build_s = round(time.perf_counter() - started, 1)
    engine = HFEngine(model_dir, "smollm2-shaped", rig.settings)
    rig.run(engine.start())
    reference = None
    try:
        reference = load_model(model_dir, rig.dtype, rig.device)
        measure_throughput(
            rig,
            engine,
            reference,
            "throughput_smollm2_135m_shape",
            figures,
            model_params=info["params"],
            build_s=build_s,
        )
    finally:
        rig.run(engine.shutdown())
        del reference
        gc.collect()
        if rig.device.type == "cuda":
            torch.cuda.empty_cache()
