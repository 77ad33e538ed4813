"""Inference throughput and latency, per engine: through the SDK over gRPC vs the same engine in-process, and vs
HF `generate` run one request at a time — all measured in this run, printed as ratios.

For each concurrency level, `concurrency` requests (greedy, `--new-tokens` tokens each, EOS ignored so every
request does the same work) run at once; aggregate output tok/s and time-to-first-token p50/p95 are reported.

    python benchmarks/inference.py [--engines hf,vllm] [--concurrency 1,4,16,32] [--new-tokens 64]

Targets (issue 3): gRPC >= 0.95x the in-process engine; the hf engine >= 6x sequential generate at 16.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import genloom
from genloom.services.inference.engine import Engine, EngineRequest, SamplingOptions
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings

MODEL = "smollm2-135m-instruct"
TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "gardens", "winter", "a market"]


@dataclass
class Run:
    seconds: float
    tokens: int
    ttft: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def ttft_pct(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]} (#{i})."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


async def in_process(engine: Engine, batch: list[list[int]], new_tokens: int) -> Run:
    options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, ids: list[int]) -> tuple[int, float]:
        start = time.perf_counter()
        first = None
        count = 0
        async for output in engine.generate(EngineRequest(f"bench-{i}-{start}", ids, options)):
            if first is None and output.token_ids:
                first = time.perf_counter() - start
            count += len(output.token_ids)
        return count, first or 0.0

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))
    return Run(time.perf_counter() - start, sum(c for c, _ in results), [t for _, t in results])


async def over_grpc(target: str, batch: list[list[int]], new_tokens: int) -> Run:
    async with genloom.AsyncClient(target=target, timeout=900) as client:

        async def one(ids: list[int]) -> tuple[int, float]:
            start = time.perf_counter()
            first = None
            count = 0
            stream = client.inference.stream(ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            async for delta in stream:
                if first is None and delta.token_ids:
                    first = time.perf_counter() - start
                count += len(delta.token_ids)
            return count, first or 0.0

        start = time.perf_counter()
        results = await asyncio.gather(*(one(ids) for ids in batch))
    return Run(time.perf_counter() - start, sum(c for c, _ in results), [t for _, t in results])


def sequential_generate(model_dir: Path, batch: list[list[int]], new_tokens: int) -> Run:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generate(torch.tensor([batch[0]]), max_new_tokens=2, do_sample=False)  # warm-up
    ttft = []
    tokens = 0
    with torch.no_grad():
        for ids in batch:  # time to first token = a one-token generate
            t0 = time.perf_counter()
            model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)
            ttft.append(time.perf_counter() - t0)
        start = time.perf_counter()
        for ids in batch:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            tokens += out.shape[1] - len(ids)
    return Run(time.perf_counter() - start, tokens, ttft)


def make_engine(kind: str, model_dir: Path) -> Engine:
    settings = InferenceSettings(engine=kind, max_batch_size=32, vllm_cpu_kvcache_gib=2)
    if kind == "vllm":
        from genloom.services.inference.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, MODEL, settings)
    from genloom.services.inference.engines.hf import HFEngine

    return HFEngine(model_dir, MODEL, settings)


async def bench_engine(
    kind: str, model_dir: Path, cache: Path, levels: list[int], new_tokens: int, batches: dict[int, list[list[int]]]
) -> dict[tuple[str, int], Run]:
    results: dict[tuple[str, int], Run] = {}
    engine = make_engine(kind, model_dir)
    await engine.start()
    try:
        await in_process(engine, batches[1], 4)  # warm-up
        for c in levels:
            results[("in-process", c)] = await in_process(engine, batches[c], new_tokens)
    finally:
        await engine.shutdown()
    env = {
        "GENLOOM_MODEL_CACHE": str(cache),
        "GENLOOM_ENGINE": kind,
        "GENLOOM_MAX_BATCH_SIZE": "32",
        "GENLOOM_VLLM_CPU_KVCACHE_GIB": "2",
    }
    with ServerProcess("inference", ["--metrics-port", "-1"], env=env) as server:
        await over_grpc(server.target, batches[1], 4)  # warm-up
        for c in levels:
            results[("gRPC via SDK", c)] = await over_grpc(server.target, batches[c], new_tokens)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    parser.add_argument("--engines", default=",".join(available))
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    cache = Path(os.environ.get("GENLOOM_MODEL_CACHE") or ModelSettings().model_cache)
    model_dir = ensure_default_model(cache, MODEL)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batches = {c: prompts(tokenizer, c) for c in sorted({1, *levels})}
    # One at a time, throughput does not depend on how many requests there are: 8 keep the baseline short.
    sequential = batches[max(levels)][:8]
    baseline = sequential_generate(model_dir, sequential, args.new_tokens)
    print(
        f"HF generate, one request at a time: {baseline.tok_s:.1f} tok/s, "
        f"TTFT p50 {baseline.ttft_pct(0.5) * 1000:.0f} ms ({len(sequential)} requests x {args.new_tokens} tokens)"
    )
    header = (
        f"{'engine':<6} {'path':<14} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'vs in-proc':>10} {'vs seq generate':>15}"
    )
    print(header)
    for kind in args.engines.split(","):
        results = asyncio.run(bench_engine(kind, model_dir, cache, levels, args.new_tokens, batches))
        for c in levels:
            for path in ("in-process", "gRPC via SDK"):
                run = results[(path, c)]
                vs_inproc = run.tok_s / results[("in-process", c)].tok_s
                print(
                    f"{kind:<6} {path:<14} {c:>4} {run.tok_s:>8.1f} {run.ttft_pct(0.5) * 1000:>7.0f}ms "
                    f"{run.ttft_pct(0.95) * 1000:>7.0f}ms {vs_inproc:>9.2f}x {run.tok_s / baseline.tok_s:>14.2f}x"
                )


if __name__ == "__main__":
    main()
