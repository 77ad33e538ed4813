"""hf engine throughput: aggregate output tok/s of HFEngine at concurrency 1, 4 and 16 vs HF `model.generate` run one
request at a time on the same prompts (greedy, ignore_eos, 128 new tokens each).

Each concurrency level starts that many requests at once; the baseline runs `--baseline-requests` of the same
prompts one after another through `generate` (its tok/s does not depend on how many it runs). Prints ratios
against the baseline measured in the same run (issue target: >= 6x at 16 concurrent), and, for reference, one
static left-padded `generate` batch of the largest concurrency (the ceiling for a batch nobody joins or leaves).

    python benchmarks/hf_engine.py [--new-tokens 128] [--concurrency 1 4 16] [--baseline-requests 4]
                                   [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloom.services.inference.engine import EngineRequest, SamplingOptions
from genloom.services.inference.engines.hf import HFEngine
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.settings import ModelSettings

MODEL = "smollm2-135m-instruct"
TOPICS = (
    "the history of the printing press",
    "how bees make honey",
    "why the sky is blue",
    "a day in the life of a lighthouse keeper",
    "the rules of chess",
    "how to bake sourdough bread",
    "the water cycle",
    "a short story about a robot learning to paint",
    "what makes a good password",
    "the life cycle of a star",
    "how trains changed cities",
    "a letter to a friend about a trip to the mountains",
    "the causes of ocean tides",
    "how vaccines work",
    "the invention of the telephone",
    "tips for learning a new language",
)


def make_prompts(tokenizer: AutoTokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def baseline_tok_s(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        produced = 0
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), **kwargs)
            produced += out.shape[1] - len(prompt)
        elapsed = time.perf_counter() - start
    del model
    return produced / elapsed


def static_batch_tok_s(model_dir: Path, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """One left-padded `generate` call over all prompts: what a fixed batch reaches with no one joining/leaving."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": pad_id}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - start
    del model
    return (out.shape[1] - width) * len(prompts) / elapsed


async def engine_run(engine: HFEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """All prompts at once; returns (aggregate output tok/s, median time to first token in s)."""
    sampling = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first_token: list[float] = []

    async def one(i: int, prompt: list[int]) -> int:
        sent = time.perf_counter()
        count = 0
        async for output in engine.generate(EngineRequest(f"bench-{i}-{sent}", prompt, sampling)):
            if count == 0:
                first_token.append(time.perf_counter() - sent)
            count += len(output.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, statistics.median(first_token)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default: one per core)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every measurement this many times and keep the best (shared CPUs)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a shared machine, fewer threads than cores keeps OpenMP barriers from stalling on a busy core.
        torch.set_num_threads(args.threads)

    cache = Path(os.environ["GENLOOM_MODEL_CACHE"]) if "GENLOOM_MODEL_CACHE" in os.environ else None
    model_dir = ensure_default_model(cache or ModelSettings().model_cache, MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, max(*args.concurrency, args.baseline_requests))
    print(f"model {MODEL}, {args.new_tokens} new tokens per request, torch threads {torch.get_num_threads()}")

    best = range(args.repeats)
    baseline = max(baseline_tok_s(model_dir, prompts[: args.baseline_requests], args.new_tokens) for _ in best)
    print(f"baseline: HF generate one request at a time ({args.baseline_requests} requests): {baseline:.1f} tok/s")

    width = max(args.concurrency)
    static = max(static_batch_tok_s(model_dir, prompts[:width], args.new_tokens, tokenizer.eos_token_id) for _ in best)
    print(f"reference: one static padded generate batch of {width}: {static:.1f} tok/s ({static / baseline:.2f}x)")

    engine = HFEngine(model_dir, MODEL, InferenceSettings(max_batch_size=max(args.concurrency)))
    await engine.start()
    try:
        print(f"\n{'concurrency':>11}  {'tok/s':>8}  {'TTFT p50':>9}  {'vs generate':>11}")
        for concurrency in args.concurrency:
            runs = [await engine_run(engine, prompts[:concurrency], args.new_tokens) for _ in best]
            tok_s, ttft = max(runs)
            print(f"{concurrency:>11}  {tok_s:>8.1f}  {ttft * 1000:>7.0f}ms  {tok_s / baseline:>10.2f}x")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
