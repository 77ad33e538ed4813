#!/usr/bin/env python3
"""GPU check for genloom's `hf` engine and a LoRA fine-tune, runnable from a bare checkout (no pip install).

What it does, on whatever `--device`/`--dtype` it is given (meant for `--device cuda --dtype bfloat16`; a CPU
float32 run is the fast dry run):

1. builds a tiny random Llama model directory with a tokenizer trained here on a built-in corpus (no downloads);
2. runs genloom's HFEngine on it: greedy generation of several prompts alone and concurrently against
   transformers' own `model.generate` (same device and dtype), seeded-sampling repeatability, Score against a
   direct forward, and throughput at concurrency 1 and 16;
3. fine-tunes a LoRA adapter with PEFT (torch.optim.AdamW + transformers' get_linear_schedule_with_warmup) on a
   tiny self-made data set repeated, saves it, loads it into the engine (`add_adapter`) and checks it changes the
   greedy output (and only for its own requests);
4. runs the test suite's `gpu`-marked tests, if any exist;
5. checks that the generated protobuf/gRPC stubs (sdk/genloom/v1, git-ignored) import with this Python's
   protobuf and grpcio (and with carried wheels, `--extra-site`);
6. prints a compact report and writes it as JSON to `--out`/gpu_report.json.

Imports: `genloom` is set up as a bare package over sdk/genloom (its __init__, the SDK, is not run: the engine
needs neither grpcio nor protobuf) and `genloom.services` over services/, exactly the mapping setup.py installs.

    python3 scripts/gpu_check.py --device cuda --dtype bfloat16 --out "$OUT"
    .venv/bin/python scripts/gpu_check.py --device cpu --dtype float32 --quick     # dry run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ----------------------------------------------------------------------------------------------- imports


def install_genloom_package() -> None:
    """Make `genloom` (sdk/genloom, without running its __init__) and `genloom.services` (services/) importable."""
    if "genloom" in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec("genloom", None, is_package=True)
    spec.submodule_search_locations = [str(REPO / "sdk" / "genloom")]
    genloom = importlib.util.module_from_spec(spec)
    sys.modules["genloom"] = genloom
    services_spec = importlib.util.spec_from_file_location(
        "genloom.services", REPO / "services" / "__init__.py", submodule_search_locations=[str(REPO / "services")]
    )
    assert services_spec is not None and services_spec.loader is not None
    services = importlib.util.module_from_spec(services_spec)
    sys.modules["genloom.services"] = services
    services_spec.loader.exec_module(services)
    genloom.services = services  # type: ignore[attr-defined]


def symlink_tree(root: Path) -> Path:
    """A directory for PYTHONPATH where `genloom` is a real package: sdk/genloom's entries plus services/.
    Used for subprocesses that import genloom fully (the SDK, pytest)."""
    pkg = root / "genloom"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "sdk" / "genloom").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "services").symlink_to(REPO / "services")
    return root


# ----------------------------------------------------------------------------------------------- tiny model

CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "List three colours: red, green and blue. List three fruits: apple, pear and plum.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm afternoon sun.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.",
    "A gRPC service defines methods with request and response messages in a proto file.",
    "Machine learning models learn patterns from data and make predictions on new inputs.",
    "Hello! How are you today? I am fine, thank you, and I hope you are well too.",
    "The train to the city leaves at nine in the morning and returns at six in the evening.",
    "In 1969, astronauts landed on the Moon and walked on its dusty grey surface.",
    "Numbers: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.",
    "Café, naïve, résumé, 東京, Привет, 🙂 — multi-byte text should round-trip cleanly.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.",
]

# The fine-tuning set: short "instruction -> answer" lines the base model has never seen, repeated.
TRAIN_TEXTS = [
    "Q: What colour is the sky? A: The sky is blue.",
    "Q: What colour is grass? A: Grass is green.",
    "Q: How many legs does a cat have? A: A cat has four legs.",
    "Q: What is two plus two? A: Two plus two is four.",
    "Q: Where is Paris? A: Paris is in France.",
    "Q: What do bees make? A: Bees make honey.",
    "Q: What is frozen water? A: Frozen water is ice.",
    "Q: What shines at night? A: The moon shines at night.",
]

PROMPT_TEXTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Hello",
    "List three colours:",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm afternoon sun. The",
    "Numbers: one, two, three,",
    "Q: What colour is the sky? A:",
]


def build_model_dir(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A random Llama + a byte-level BPE tokenizer trained on CORPUS + TRAIN_TEXTS, saved in fp32 safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS + TRAIN_TEXTS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tokenizer.save_pretrained(path)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"])
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=1024,
        # Larger than the usual 0.02, so the random model's logits are less flat (fewer exact near-ties).
        initializer_range=0.05,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = pad
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    return {
        "path": str(path),
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "params": params,
        "eos_id": eos,
        "pad_id": pad,
    }


def build_smollm2_shaped_dir(path: Path, tokenizer_dir: Path, dtype: Any, device: Any) -> dict[str, Any]:
    """A random model with SmolLM2-135M's shape (the project's default model: 30 layers, hidden 576, 9 heads /
    3 KV heads, 49152 vocab, tied embeddings) and the tiny tokenizer: for throughput figures closer to the real
    model's than the tiny one gives. Built on the device, saved in the run's dtype."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir()
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    tiny = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.pad_token_id = tiny["pad_token_id"]
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"path": str(path), "params": params, "layers": 30, "hidden": 576, "vocab": 49152}


# ----------------------------------------------------------------------------------------------- helpers


class Report:
    def __init__(self, path: Path | None = None) -> None:
        self.data: dict[str, Any] = {"checks": {}}
        self.path = path

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def check(self, name: str, status: str, **details: Any) -> None:
        self.data["checks"][name] = {"status": status, **details}
        self.save()
        line = f"[{status.upper():4}] {name}"
        brief = {k: v for k, v in details.items() if not isinstance(v, (list, dict)) or len(str(v)) < 160}
        if brief:
            line += ": " + ", ".join(f"{k}={v}" for k, v in brief.items())
        print(line, flush=True)

    async def run(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        start = time.perf_counter()
        try:
            await fn()
        except Exception as exc:
            self.check(name, "fail", error=repr(exc), traceback=traceback.format_exc()[-3000:])
        finally:
            entry = self.data["checks"].get(name)
            if entry is not None:
                entry["seconds"] = round(time.perf_counter() - start, 2)


def pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace, report: Report, work: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    install_genloom_package()
    from genloom.services.inference.engine import EngineOutput, EngineRequest, SamplingOptions, ScoreQuery
    from genloom.services.inference.engines.hf import HFEngine
    from genloom.services.inference.settings import InferenceSettings

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    low_precision = dtype in (torch.bfloat16, torch.float16)

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **{
            name: pkg_version(name)
            for name in ("peft", "accelerate", "safetensors", "tokenizers", "grpcio", "protobuf")
        },
        "device": str(device),
        "dtype": args.dtype,
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
            smi = subprocess.run(  # noqa: ASYNC221 (once, before anything runs)
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = smi.stdout.strip() or None
        except Exception:
            env["driver"] = None
    else:
        env["cpu_threads"] = torch.get_num_threads()
    report.data["environment"] = env
    print("environment: " + json.dumps(env), flush=True)

    # 1. the tiny model
    model_dir = work / "tiny-llama"
    model_dir.mkdir()
    t0 = time.perf_counter()
    model_info = build_model_dir(model_dir, args)
    model_info["build_s"] = round(time.perf_counter() - t0, 2)
    report.data["model"] = model_info
    print("model: " + json.dumps(model_info), flush=True)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = model_info["pad_id"]
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    new_tokens = [args.greedy_tokens + 4 * (i % 4) for i in range(len(prompts))]

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def hf_generate(model: Any, prompt: Sequence[int], n: int, **kw: Any) -> list[int]:
        ids = torch.tensor([list(prompt)], device=device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=pad_id, **kw
            )
        return out[0, len(prompt) :].tolist()

    def forward_logits(model: Any, ids: Sequence[int]) -> Any:
        with torch.no_grad():
            return model(torch.tensor([list(ids)], device=device)).logits[0].float()

    settings = InferenceSettings(
        engine="hf", device=str(device), dtype=args.dtype, max_batch_size=32, max_loras=2, max_lora_rank=64
    )
    engine = HFEngine(model_dir, "tiny-llama", settings)
    t0 = time.perf_counter()
    await engine.start()
    report.data["engine"] = {
        **{k: str(v) for k, v in vars(engine.info()).items()},
        "start_s": round(time.perf_counter() - t0, 2),
    }

    counter = iter(range(10**9))

    def request(prompt: Sequence[int], adapter: str | None = None, **sampling: Any) -> EngineRequest:
        sampling.setdefault("temperature", 0.0)
        return EngineRequest(f"r{next(counter)}", list(prompt), SamplingOptions(**sampling), adapter=adapter)

    async def collect(req: EngineRequest, delay: float = 0.0, eng: Any = None) -> list[int]:
        if delay:
            await asyncio.sleep(delay)
        outputs: list[EngineOutput] = [o async for o in (eng or engine).generate(req)]
        return [t for o in outputs for t in o.token_ids]

    def divergence(prompt: Sequence[int], expected: list[int], got: list[int], model: Any = None) -> dict[str, Any]:
        """Where two greedy sequences part, and how close the reference's two candidates were there."""
        k = common_prefix(expected, got)
        info: dict[str, Any] = {"position": k, "of": len(expected)}
        if k < min(len(expected), len(got)):
            logits = forward_logits(model if model is not None else ref, [*prompt, *expected[:k]])[-1]
            a, b = logits[expected[k]].item(), logits[got[k]].item()
            info.update(
                ref_token=expected[k],
                got_token=got[k],
                ref_logit=round(a, 4),
                got_logit=round(b, 4),
                gap=round(a - b, 4),
            )
        return info

    def near_tie(gap: float | None, scale: float) -> bool:
        # bf16 keeps 8 significant bits: two logits within a few percent of each other can swap order when the
        # same row is computed in another batch shape / with padding.
        return gap is not None and abs(gap) <= max(0.02 * scale, 0.05)

    def all_near_ties(divergences: list[dict[str, Any]]) -> bool:
        return all(
            near_tie(d.get("gap"), max(abs(d.get("ref_logit", 0.0)), abs(d.get("got_logit", 0.0)))) for d in divergences
        )

    # 2a. greedy: engine alone and concurrent vs transformers' generate
    references: list[list[int]] = []
    greedy_alone: list[list[int]] = []

    async def greedy_check() -> None:
        for p, n in zip(prompts, new_tokens, strict=False):
            references.append(hf_generate(ref, p, n))
        for p, n in zip(prompts, new_tokens, strict=False):
            greedy_alone.append(await collect(request(p, max_new_tokens=n)))
        # Concurrent: staggered arrivals (rows merge into a running batch) plus a burst (prefilled together).
        staggered = await asyncio.gather(
            *(
                collect(request(p, max_new_tokens=n), delay=0.004 * i)
                for i, (p, n) in enumerate(zip(prompts, new_tokens, strict=False))
            )
        )
        burst = await asyncio.gather(
            *(collect(request(p, max_new_tokens=n)) for p, n in zip(prompts, new_tokens, strict=False))
        )
        total = sum(len(r) for r in references)
        result: dict[str, Any] = {"prompts": len(prompts), "reference_tokens": total}
        ok = True
        for label, runs in (("alone", greedy_alone), ("staggered", staggered), ("burst", burst)):
            exact = sum(r == e for r, e in zip(runs, references, strict=False))
            agree = sum(common_prefix(e, r) for r, e in zip(runs, references, strict=False))
            diverged = [
                {"prompt": i, **divergence(prompts[i], e, r)}
                for i, (r, e) in enumerate(zip(runs, references, strict=False))
                if r != e
            ]
            explained = all_near_ties(diverged)
            result[label] = {
                "exact": f"{exact}/{len(runs)}",
                "token_agreement": round(agree / total, 4),
                "divergences": diverged,
                "all_divergences_near_ties": explained,
            }
            if diverged and not (low_precision and explained):
                ok = False
        exact_all = all(result[k]["exact"] == f"{len(prompts)}/{len(prompts)}" for k in ("alone", "staggered", "burst"))
        status = "pass" if exact_all else ("pass" if ok else "fail")
        note = None
        if not exact_all and ok:
            note = (
                f"{args.dtype}: every divergence is at a near-tie of the reference's top logits "
                "(batch shape / left padding changes bf16 rounding); equal up to that point"
            )
        report.check(
            "greedy_vs_transformers_generate",
            status,
            alone=result["alone"]["exact"],
            staggered=result["staggered"]["exact"],
            burst=result["burst"]["exact"],
            agreement_alone=result["alone"]["token_agreement"],
            agreement_staggered=result["staggered"]["token_agreement"],
            agreement_burst=result["burst"]["token_agreement"],
            note=note,
            detail=result,
        )

    await report.run("greedy_vs_transformers_generate", greedy_check)

    # 2b. seeded sampling
    async def sampling_check() -> None:
        def sampled(seed: int) -> EngineRequest:
            return request(prompts[1], temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=32, ignore_eos=True)

        first = await collect(sampled(1234))
        second = await collect(sampled(1234))
        others = [collect(request(p, max_new_tokens=24), delay=0.003 * i) for i, p in enumerate(prompts)]
        in_batch, other_seed, *_ = await asyncio.gather(
            collect(sampled(1234), delay=0.01), collect(sampled(4321)), *others
        )
        status = "pass" if first == second and other_seed != first and (in_batch == first or low_precision) else "fail"
        report.check(
            "seeded_sampling_repeatable",
            status,
            alone_twice_equal=first == second,
            in_batch_equal=in_batch == first,
            in_batch_agreement=round(common_prefix(first, in_batch) / len(first), 4),
            other_seed_differs=other_seed != first,
            note=None if in_batch == first else "in-batch draw differs: bf16 logits of a padded batch row",
        )

    await report.run("seeded_sampling_repeatable", sampling_check)

    # 2c. score vs a direct forward
    async def score_check() -> None:
        def ids(text: str) -> list[int]:
            return tokenizer(text)["input_ids"]

        queries = [
            ScoreQuery(ids("The capital of France is"), [ids(" Paris"), ids(" Rome, and"), ids(" a city in Europe.")]),
            ScoreQuery(ids("Q: What colour is grass? A:"), [ids(" Grass is green."), ids(" blue")]),
            ScoreQuery(ids("Hello"), [ids("!"), ids(" How are you today?")]),
        ]
        scores = await engine.score(queries)
        fp32 = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
            if low_precision
            else None
        )
        max_diff = max_diff_fp32 = 0.0
        n = 0
        for query, per in zip(queries, scores, strict=False):
            prompt = list(query.prompt_token_ids)
            for cont, got in zip(query.continuations, per, strict=False):
                for model, which in ((ref, "same"), (fp32, "fp32")):
                    if model is None:
                        continue
                    lp = torch.log_softmax(forward_logits(model, prompt + list(cont)), -1)
                    want = [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)]
                    diff = max(abs(g - w) for g, w in zip(got, want, strict=False))
                    if which == "same":
                        max_diff = max(max_diff, diff)
                        n += len(cont)
                    else:
                        max_diff_fp32 = max(max_diff_fp32, diff)
        del fp32
        tol = 0.1 if low_precision else 1e-4
        report.check(
            "score_vs_direct_forward",
            "pass" if max_diff <= tol else "fail",
            tokens=n,
            max_abs_diff=round(max_diff, 6),
            tolerance=tol,
            max_abs_diff_vs_fp32_model=round(max_diff_fp32, 6) if low_precision else None,
        )

    await report.run("score_vs_direct_forward", score_check)

    # 2d. throughput
    async def throughput(eng: Any, model: Any, name: str, extra: dict[str, Any]) -> None:
        n = args.bench_tokens
        bench_prompts = [prompts[i % len(prompts)] for i in range(args.concurrency)]

        await collect(request(prompts[0], max_new_tokens=16, ignore_eos=True), eng=eng)  # warm
        sync(device)
        t = time.perf_counter()
        seq_tokens = 0
        for p in bench_prompts[: args.sequential_requests]:
            seq_tokens += len(await collect(request(p, max_new_tokens=n, ignore_eos=True), eng=eng))
        sync(device)
        seq_s = time.perf_counter() - t
        t = time.perf_counter()
        results = await asyncio.gather(
            *(collect(request(p, max_new_tokens=n, ignore_eos=True), eng=eng) for p in bench_prompts)
        )
        sync(device)
        conc_s = time.perf_counter() - t
        conc_tokens = sum(len(r) for r in results)
        c1, cn = seq_tokens / seq_s, conc_tokens / conc_s
        # transformers' own generate for context: one request, and one left-padded static batch of the same prompts.
        hf_generate(model, prompts[0], 8)  # warm
        sync(device)
        t = time.perf_counter()
        g1 = len(hf_generate(model, prompts[0], n, min_new_tokens=n))
        sync(device)
        gen1 = g1 / (time.perf_counter() - t)
        tokenizer.padding_side = "left"
        texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(args.concurrency)]
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        batch.pop("token_type_ids", None)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)
        sync(device)
        genb = (out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])) / (time.perf_counter() - t)
        report.check(
            name,
            "info",
            **extra,
            new_tokens_per_request=n,
            c1_requests=args.sequential_requests,
            c1_tok_s=round(c1, 1),
            concurrency=args.concurrency,
            concurrent_tok_s=round(cn, 1),
            ratio_vs_sequential=round(cn / c1, 2),
            hf_generate_single_tok_s=round(gen1, 1),
            hf_generate_static_batch_tok_s=round(genb, 1),
        )

    async def throughput_tiny() -> None:
        await throughput(engine, ref, "throughput_tiny", {"model_params": model_info["params"]})

    await report.run("throughput_tiny", throughput_tiny)

    async def throughput_smollm2_shape() -> None:
        big_dir = work / "smollm2-shaped"
        t0 = time.perf_counter()
        info = build_smollm2_shaped_dir(big_dir, model_dir, dtype, device)
        build_s = round(time.perf_counter() - t0, 1)
        big_engine = HFEngine(big_dir, "smollm2-shaped", settings)
        await big_engine.start()
        big_ref = AutoModelForCausalLM.from_pretrained(big_dir, dtype=dtype).to(device).eval()
        try:
            await throughput(
                big_engine,
                big_ref,
                "throughput_smollm2_135m_shape",
                {"model_params": info["params"], "build_s": build_s},
            )
        finally:
            await big_engine.shutdown()
            del big_ref
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.bench_smollm2_shape:
        await report.run("throughput_smollm2_135m_shape", throughput_smollm2_shape)

    # 3. LoRA fine-tune with PEFT, then serve the adapter from the engine
    adapter_dir = work / "lora-adapter"
    train_state: dict[str, Any] = {}

    async def lora_train() -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        enc = tokenizer([t + tokenizer.eos_token for t in TRAIN_TEXTS], padding=True, return_tensors="pt")
        enc.pop("token_type_ids", None)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batch = {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "labels": labels.to(device),
        }
        real_tokens = int(enc["attention_mask"].sum())
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps
        )

        def eval_loss(m: Any) -> float:
            m.eval()
            with torch.no_grad():
                loss = m(**batch).loss.item()
            m.train()
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = eval_loss(model)
        model.train()
        losses: list[float] = []
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        sync(device)
        elapsed = time.perf_counter() - t
        after = eval_loss(model)
        model.save_pretrained(adapter_dir)
        adapter_dtypes = sorted({str(p.dtype) for p in trainable})
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        del model, base, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        train_state["ok"] = True
        fell = after < before * 0.8 and losses[-1] < losses[0]
        report.check(
            "lora_finetune",
            "pass" if fell else "fail",
            steps=args.steps,
            batch_sequences=len(TRAIN_TEXTS),
            tokens_per_step=real_tokens,
            loss_first_step=round(losses[0], 4),
            loss_last_step=round(losses[-1], 4),
            eval_loss_before=round(before, 4),
            eval_loss_after=round(after, 4),
            train_tok_s=round(real_tokens * args.steps / elapsed, 1),
            steps_per_s=round(args.steps / elapsed, 2),
            trainable_params=sum(p.numel() for p in trainable),
            adapter_param_dtypes=adapter_dtypes,
            peak_gpu_mib=peak,
            optimizer="torch.optim.AdamW + transformers.get_linear_schedule_with_warmup",
            loss_curve=[round(x, 3) for x in losses[:: max(1, args.steps // 10)]],
        )

    await report.run("lora_finetune", lora_train)

    async def lora_serve() -> None:
        if not train_state.get("ok"):
            report.check("lora_adapter_in_engine", "skip", reason="fine-tune failed")
            return
        from peft import PeftModel

        await engine.add_adapter("ft", str(adapter_dir))
        try:
            # Base and adapter requests side by side in one batch.
            n = len(prompts)
            results = await asyncio.gather(
                *(
                    collect(request(p, max_new_tokens=k), delay=0.003 * i)
                    for i, (p, k) in enumerate(zip(prompts, new_tokens, strict=False))
                ),
                *(
                    collect(request(p, adapter="ft", max_new_tokens=k), delay=0.003 * i)
                    for i, (p, k) in enumerate(zip(prompts, new_tokens, strict=False))
                ),
            )
            base_out, adapted = results[:n], results[n:]
            changed = sum(a != b for a, b in zip(adapted, greedy_alone, strict=False))
            base_same = sum(b == g for b, g in zip(base_out, greedy_alone, strict=False))
            peft_ref = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), str(adapter_dir)
            ).eval()
            peft_refs = [hf_generate(peft_ref, p, k) for p, k in zip(prompts, new_tokens, strict=False)]
            peft_exact = sum(a == r for a, r in zip(adapted, peft_refs, strict=False))
            peft_agree = sum(common_prefix(r, a) for a, r in zip(adapted, peft_refs, strict=False)) / sum(
                len(r) for r in peft_refs
            )
            # Any difference from the references: how close were the reference model's two candidates there?
            base_divs = [
                {"prompt": i, **divergence(prompts[i], g, b)}
                for i, (b, g) in enumerate(zip(base_out, greedy_alone, strict=True))
                if b != g
            ]
            peft_divs = [
                {"prompt": i, **divergence(prompts[i], r, a, model=peft_ref)}
                for i, (a, r) in enumerate(zip(adapted, peft_refs, strict=True))
                if a != r
            ]
            # Did it learn? Greedy continuation of a training question, with and without the adapter.
            learned = []
            for text in TRAIN_TEXTS[:4]:
                q, a = text.split(" A:")
                prompt = tokenizer(q + " A:")["input_ids"]
                target = tokenizer(a)["input_ids"]
                with_ft = await collect(request(prompt, adapter="ft", max_new_tokens=len(target)))
                without = await collect(request(prompt, max_new_tokens=len(target)))
                learned.append(
                    (
                        common_prefix(target, with_ft) / len(target),
                        common_prefix(target, without) / len(target),
                        tokenizer.decode(with_ft),
                    )
                )
            del peft_ref
        finally:
            await engine.remove_adapter("ft")
        after_removal = await collect(request(prompts[0], max_new_tokens=new_tokens[0]))
        # Exact in fp32; in bf16 the batch shape (and PEFT's mixed-batch path) may flip a near-tie, nothing more.
        if low_precision:
            numerics_ok = all_near_ties(base_divs) and all_near_ties(peft_divs)
        else:
            numerics_ok = base_same == n and peft_exact == n
        ok = changed == n and after_removal == greedy_alone[0] and numerics_ok
        status = "pass" if ok else "fail"
        report.check(
            "lora_adapter_in_engine",
            status,
            adapter_changes_greedy=f"{changed}/{n}",
            base_rows_unchanged=f"{base_same}/{n}",
            base_after_removal_unchanged=after_removal == greedy_alone[0],
            vs_peft_generate_exact=f"{peft_exact}/{n}",
            vs_peft_generate_agreement=round(peft_agree, 4),
            base_divergences_near_ties=all_near_ties(base_divs),
            peft_divergences_near_ties=all_near_ties(peft_divs),
            learned_answer_prefix_with_adapter=round(sum(x[0] for x in learned) / len(learned), 3),
            learned_answer_prefix_base=round(sum(x[1] for x in learned) / len(learned), 3),
            sample_answer=learned[0][2],
            detail={"base_divergences": base_divs, "peft_divergences": peft_divs},
        )

    await report.run("lora_adapter_in_engine", lora_serve)
    await engine.shutdown()
    gc.collect()


def gpu_tests(report: Report, work: Path, timeout: int) -> None:
    marked = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("*.py")
        if re.search(r"mark\.gpu\b|pytestmark\s*=.*\bgpu\b", p.read_text(errors="replace"))
    )
    if not marked:
        report.check("pytest_gpu_marked", "skip", reason="no test in tests/ is marked gpu")
        return
    site = symlink_tree(work / "pytest-site")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *marked]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        report.check("pytest_gpu_marked", "fail", files=marked, error=f"timed out after {timeout}s")
        return
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    status = {0: "pass", 5: "skip"}.get(proc.returncode, "fail")  # 5: nothing collected under -m gpu
    report.check(
        "pytest_gpu_marked",
        status,
        files=marked,
        rc=proc.returncode,
        summary=tail[-1] if tail else "",
        output_tail="\n".join(tail[-30:]),
    )


STUB_PROBE = r"""
import importlib, importlib.machinery, importlib.util, json, sys, pathlib
repo = pathlib.Path(sys.argv[1])
out = {}
try:
    import google.protobuf, grpc
    out["protobuf"], out["grpcio"] = google.protobuf.__version__, grpc.__version__
except Exception as exc:
    out["error"] = repr(exc)
spec = importlib.machinery.ModuleSpec("genloom", None, is_package=True)
spec.submodule_search_locations = [str(repo / "sdk" / "genloom")]
sys.modules["genloom"] = importlib.util.module_from_spec(spec)
stubs = sorted(p.stem for p in (repo / "sdk" / "genloom" / "v1").glob("*_pb2*.py"))
out["stubs"] = len(stubs)
failed = {}
for name in stubs:
    try:
        importlib.import_module("genloom.v1." + name)
    except BaseException as exc:
        failed[name] = repr(exc)[:300]
out["failed"] = failed
print(json.dumps(out))
"""


def stub_check(report: Report, extra_site: str | None) -> None:
    v1 = REPO / "sdk" / "genloom" / "v1"
    gencode = None
    for f in sorted(v1.glob("*_pb2.py"))[:1]:
        m = re.search(r"Protobuf Python Version: (\S+)", f.read_text())
        gencode = m.group(1) if m else None
    grpc_gen = None
    for f in sorted(v1.glob("*_pb2_grpc.py"))[:1]:
        m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", f.read_text())
        grpc_gen = m.group(1) if m else None
    if not list(v1.glob("*_pb2.py")):
        report.check(
            "protobuf_stubs_import", "skip", reason="sdk/genloom/v1 has no generated stubs (make protos; carry it)"
        )
        return
    results: dict[str, Any] = {}
    envs = [("native", os.environ.get("PYTHONPATH", ""))]
    if extra_site:
        envs.append(
            ("with_carried_wheels", os.pathsep.join(filter(None, [extra_site, os.environ.get("PYTHONPATH", "")])))
        )
    for label, pythonpath in envs:
        env = {**os.environ, "PYTHONPATH": pythonpath}
        proc = subprocess.run(
            [sys.executable, "-c", STUB_PROBE, str(REPO)], env=env, capture_output=True, text=True, timeout=120
        )
        try:
            results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception:
            results[label] = {"error": (proc.stdout + proc.stderr)[-500:]}
    ok = any(not r.get("failed") and not r.get("error") for r in results.values())
    native = results["native"]
    report.check(
        "protobuf_stubs_import",
        "pass" if ok else "fail",
        stubs_gencode_protobuf=gencode,
        stubs_grpc_generated=grpc_gen,
        native_protobuf=native.get("protobuf"),
        native_grpcio=native.get("grpcio"),
        native_ok=not native.get("failed") and not native.get("error"),
        carried_ok=(
            not results["with_carried_wheels"].get("failed") and not results["with_carried_wheels"].get("error")
        )
        if "with_carried_wheels" in results
        else None,
        detail=results,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_report.json")
    parser.add_argument("--quick", action="store_true", help="smaller model and runs (CPU dry run)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--bench-tokens", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pytest-timeout", type=int, default=180)
    parser.add_argument(
        "--bench-smollm2-shape",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure throughput on a random model of SmolLM2-135M's shape (default: on cuda)",
    )
    parser.add_argument("--extra-site", default=None, help="site dir of carried wheels (protobuf/grpcio) to try")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads = 128, 2, 4
        args.greedy_tokens, args.bench_tokens, args.sequential_requests, args.steps = 12, 24, 2, 40

    if args.bench_smollm2_shape is None:
        args.bench_smollm2_shape = args.device.startswith("cuda")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu_report.json")
    report.data["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genloom-gpu-check-") as tmp:
        work = Path(tmp)
        try:
            import torch

            if args.device.startswith("cuda") and not torch.cuda.is_available():
                report.check("cuda_available", "fail", error="torch.cuda.is_available() is False")
            else:
                asyncio.run(main_async(args, report, work))
        except Exception as exc:
            report.check("setup", "fail", error=repr(exc), traceback=traceback.format_exc()[-3000:])
        gpu_tests(report, work, args.pytest_timeout)
        stub_check(report, args.extra_site)
    report.data["total_s"] = round(time.perf_counter() - started, 1)
    statuses = [c["status"] for c in report.data["checks"].values()]
    report.data["overall"] = "fail" if "fail" in statuses else "pass"
    path = out / "gpu_report.json"
    report.save()
    print(f"\noverall: {report.data['overall']} in {report.data['total_s']} s; report: {path}", flush=True)
    return 0 if report.data["overall"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
