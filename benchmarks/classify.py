"""Classify throughput, SCORE vs GENERATE: 200 labeled short texts through TaskService.Classify over gRPC (the
SDK, batches of `--batch-size` texts, one batch after another) by each method, per engine, on one `genloom serve
all` process per engine. Same prompts, labels and examples for both methods; greedy generation.

The data set is built here from templates and word lists (deterministic, no downloads): 3-class sentiment
(positive / negative / neutral) over product and service reviews, balanced. Few-shot examples come from a
separate draw and never appear among the 200 texts.

Each (engine, shots) configuration runs the methods alternately `--repeats` times (so drift on a shared machine
hits both alike) after one warm-up batch each; texts/s is the median over the repeats, with the min-max range.
The ratio is score texts/s / generate texts/s in the same run (issue target: >= 5x). Accuracy is over all 200
texts; a GENERATE reply that names no label counts as wrong (reported as "no label").

A third row per configuration ("direct", off with --no-direct) is a reference, not a task method: the same SCORE
prompts (the task's prompt builder, tokenized by the tokenizer service) sent by the client as ONE
InferenceService.Score call per batch, while the task service sends one Score call per text. The gap between
"score" and "direct" is what batching the texts of a request into one Score call would be worth on that engine.

    python benchmarks/classify.py [--engines hf,vllm] [--texts 200] [--batch-size 32] [--shots 0,3] [--repeats 1]
                                  [--threads N] [--no-direct]

Runtime on a 2-core CPU with the defaults: about 5 minutes for hf, 8 for vllm (its SCORE passes are the slow part;
--no-direct or --shots 3 shorten it). Use --repeats 3 for medians on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import genloom
from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings
from genloom.services.tasks.prompts import classify_prompt
from genloom.v1 import common_pb2, tasks_pb2

MODEL = "smollm2-135m-instruct"
LABELS = {
    "positive": "the writer likes it or is happy with it",
    "negative": "the writer dislikes it or is unhappy with it",
    "neutral": "a plain statement of fact, no opinion",
}
METHODS = ("score", "generate")
DIRECT = "direct"
_ROLES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}


def _words(text: str) -> list[str]:
    """A "|"-separated word list written over several lines."""
    return [word.strip() for word in " ".join(text.split()).split("|")]


_SUBJECTS = _words("""the hotel room|this phone|the new album|our waiter|the delivery|the movie|this laptop|the concert|
the coffee|the app|the hiking backpack|the pizza|the train ride|the museum tour|this vacuum cleaner|
the customer service|the headset|the novel|the yoga class|the rental car|the dentist|the bakery|the video game|
the wireless router""")
_POSITIVE_ADJ = _words("wonderful|excellent|fantastic|delightful|superb|great|lovely|brilliant|amazing|perfect")
_NEGATIVE_ADJ = _words("terrible|awful|disappointing|horrible|useless|dreadful|broken|rude|overpriced|miserable")
_POSITIVE_TAIL = _words("""I would happily buy it again|it made my whole week|everyone should try it|worth every penny|
I am so glad we chose it|it was better than I hoped""")
_NEGATIVE_TAIL = _words("""I want my money back|never again|I regret paying for it|it ruined my weekend|
I would not recommend it to anyone|it was a complete waste of time""")
_WHEN = _words("on Monday|last Tuesday|this morning|in March|two weeks ago|yesterday|at noon|on the weekend")
_FACTS = _words("""comes in black and grey|has a two-year warranty|is sold in most stores|was released in 2021|
weighs about two kilograms|opens at nine|is on the second floor|takes about an hour""")

_TEMPLATES = {
    "positive": (
        "{S} was {pos}.",
        "I absolutely loved {s}; {ptail}.",
        "{S} was {pos} and {pos2}, {ptail}!",
        "Honestly, {s} was {pos}. {Ptail}.",
        "{Pos} experience overall: {s} was {pos2}.",
    ),
    "negative": (
        "{S} was {neg}.",
        "I really hated {s}; {ntail}.",
        "{S} was {neg} and {neg2}, {ntail}!",
        "Honestly, {s} was {neg}. {Ntail}.",
        "{Neg} experience overall: {s} was {neg2}.",
    ),
    "neutral": (
        "{S} {fact}.",
        "I used {s} {when}.",
        "{S} arrived {when}.",
        "We got {s} {when}; it {fact}.",
        "According to the label, {s} {fact}.",
    ),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def make_texts(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (text, label) pairs, labels balanced and shuffled; deterministic for a seed."""
    rng = random.Random(seed)
    names = list(LABELS)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < count:
        label = names[len(out) % len(names)]
        s = rng.choice(_SUBJECTS)
        pos, pos2 = rng.sample(_POSITIVE_ADJ, 2)
        neg, neg2 = rng.sample(_NEGATIVE_ADJ, 2)
        ptail, ntail = rng.choice(_POSITIVE_TAIL), rng.choice(_NEGATIVE_TAIL)
        text = rng.choice(_TEMPLATES[label]).format(
            s=s,
            S=_cap(s),
            pos=pos,
            Pos=_cap(pos),
            pos2=pos2,
            neg=neg,
            Neg=_cap(neg),
            neg2=neg2,
            ptail=ptail,
            Ptail=_cap(ptail),
            ntail=ntail,
            Ntail=_cap(ntail),
            fact=rng.choice(_FACTS),
            when=rng.choice(_WHEN),
        )
        if text not in seen:  # every text once
            seen.add(text)
            out.append((text, label))
    rng.shuffle(out)
    return out


@dataclass
class Outcome:
    seconds: list[float] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    changed: int = 0  # texts whose prediction differed between repeats
    completion_tokens: int = 0
    prompt_tokens: int = 0

    def texts_s(self, texts: int) -> float:
        return texts / statistics.median(self.seconds)

    def accuracy(self, gold: Sequence[str]) -> float:
        return sum(p == g for p, g in zip(self.predictions, gold, strict=True)) / len(gold)


def classify_all(
    client: genloom.Client, texts: Sequence[str], method: str, examples: Sequence[tuple[str, str]], batch_size: int
) -> tuple[float, list[str], int, int]:
    """All texts, one batch after another: (seconds, predicted labels, prompt tokens, completion tokens)."""
    predictions: list[str] = []
    prompt_tokens = completion_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        result = client.tasks.classify(
            list(texts[i : i + batch_size]),
            labels=LABELS,
            method=method,
            examples=examples,  # type: ignore[arg-type]
        )
        predictions += result.labels
        prompt_tokens += result.usage.prompt_tokens
        completion_tokens += result.usage.completion_tokens
    return time.perf_counter() - start, predictions, prompt_tokens, completion_tokens


def score_directly(
    client: genloom.Client, texts: Sequence[str], examples: Sequence[tuple[str, str]], batch_size: int
) -> tuple[float, list[str], int, int]:
    """The reference: the task's SCORE prompts, tokenized, then one Score call per batch (timed together)."""
    labels = [tasks_pb2.ClassLabel(name=name, description=about) for name, about in LABELS.items()]
    shots = [tasks_pb2.ClassifyExample(text=text, labels=[label]) for text, label in examples]
    names = list(LABELS)
    predictions: list[str] = []
    prompt_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        conversations = [
            [
                {"role": _ROLES[role], "content": content}
                for role, content in classify_prompt(text, labels, shots).with_examples(range(len(shots))).messages()
            ]
            for text in texts[i : i + batch_size]
        ]
        prompts = [r.ids for r in client.tokenizer.tokenize(conversations, add_special_tokens=False).results]
        scores = client.inference.score([(ids, names) for ids in prompts])
        predictions += [names[r.best] for r in scores.results]
        prompt_tokens += sum(len(ids) for ids in prompts)
    return time.perf_counter() - start, predictions, prompt_tokens, 0


def bench_engine(
    kind: str, cache: Path, data: list[tuple[str, str]], shots: list[int], args: argparse.Namespace
) -> dict[tuple[int, str], Outcome]:
    env = {
        "GENLOOM_MODEL_CACHE": str(cache),
        "GENLOOM_ENGINE": kind,
        "GENLOOM_MAX_BATCH_SIZE": str(args.max_batch_size),
        "GENLOOM_VLLM_CPU_KVCACHE_GIB": "2",
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    texts = [t for t, _ in data]
    pool = [(t, lb) for t, lb in make_texts(30 * max([*shots, 1]), seed=args.seed + 1) if t not in set(texts)]
    # One example per label in turn (positive, negative, neutral, ...), taken from a separate draw.
    by_label = {name: [t for t, lb in pool if lb == name] for name in LABELS}
    ordered = [(by_label[name][i], name) for i in range(max([*shots, 1])) for name in LABELS]
    results: dict[tuple[int, str], Outcome] = {}
    started = time.perf_counter()
    with (
        ServerProcess("all", ["--metrics-port", "-1"], env=env) as server,
        genloom.Client(target=server.target, timeout=900) as client,
    ):
        print(f"[{kind}] server ready in {time.perf_counter() - started:.0f}s", flush=True)
        methods = [*METHODS, DIRECT] if args.direct else list(METHODS)

        def run(
            method: str, batch: Sequence[str], examples: Sequence[tuple[str, str]]
        ) -> tuple[float, list[str], int, int]:
            if method == DIRECT:
                return score_directly(client, batch, examples, args.batch_size)
            return classify_all(client, batch, method, examples, args.batch_size)

        for n in shots:
            examples = ordered[:n]
            for method in methods:  # warm-up: one batch each (the server's first calls compile/allocate)
                run(method, texts[: args.batch_size], examples)
            for repeat in range(args.repeats):
                # Alternate the order, so slow phases of a shared machine fall on every method alike.
                for method in methods if repeat % 2 == 0 else methods[::-1]:
                    seconds, predictions, prompt_tokens, completion_tokens = run(method, texts, examples)
                    outcome = results.setdefault((n, method), Outcome())
                    if outcome.predictions:
                        outcome.changed += sum(a != b for a, b in zip(outcome.predictions, predictions, strict=True))
                    outcome.seconds.append(seconds)
                    outcome.predictions = predictions
                    outcome.prompt_tokens, outcome.completion_tokens = prompt_tokens, completion_tokens
                    print(
                        f"[{kind}] {n}-shot {method:<8} run {repeat + 1}: {seconds:6.1f}s "
                        f"({len(texts) / seconds:.1f} texts/s)",
                        flush=True,
                    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    parser.add_argument("--engines", default=",".join(available))
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="texts per Classify call (server max 64)")
    parser.add_argument("--shots", default="0,3", help="comma-separated example counts, one configuration each")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the texts per method (median)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="GENLOOM_MAX_BATCH_SIZE of the server")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of the server (0 = the runtime's default: one per core); on a shared machine, fewer "
        "threads than cores keeps OpenMP barriers from stalling on a busy core",
    )
    parser.add_argument(
        "--no-direct", dest="direct", action="store_false", help="skip the direct one-Score-call-per-batch reference"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shots = [int(s) for s in args.shots.split(",")]
    cache = Path(os.environ.get("GENLOOM_MODEL_CACHE") or ModelSettings().model_cache)
    ensure_default_model(cache, MODEL)
    data = make_texts(args.texts, seed=args.seed)
    gold = [label for _, label in data]
    counts = ", ".join(f"{name} {gold.count(name)}" for name in LABELS)
    print(
        f"{len(data)} texts ({counts}), batches of {args.batch_size}, median of {args.repeats} runs per method, "
        f"{os.cpu_count()} CPUs, server threads {args.threads or 'default'}"
    )

    rows = []
    for kind in args.engines.split(","):
        results = bench_engine(kind, cache, data, shots, args)
        rows += [(kind, n, results[(n, "score")], results[(n, "generate")], results.get((n, DIRECT))) for n in shots]

    print()
    print(
        f"{'engine':<6} {'shots':>5} {'method':<8} {'texts/s':>8} {'(min-max)':>13} {'accuracy':>8} "
        f"{'no label':>8} {'prompt tok/text':>15} {'gen tok/text':>12} {'vs generate':>11}"
    )
    for kind, n, score, generate, direct in rows:
        base = generate.texts_s(len(data))
        for method, outcome in (("score", score), ("generate", generate), (DIRECT, direct)):
            if outcome is None:
                continue
            spread = f"{len(data) / max(outcome.seconds):.1f}-{len(data) / min(outcome.seconds):.1f}"
            unmatched = sum(not p for p in outcome.predictions)
            ratio = f"{outcome.texts_s(len(data)) / base:.2f}x" if method != "generate" else ""
            print(
                f"{kind:<6} {n:>5} {method:<8} {outcome.texts_s(len(data)):>8.1f} {spread:>13} "
                f"{outcome.accuracy(gold):>8.1%} {unmatched if method == 'generate' else '-':>8} "
                f"{outcome.prompt_tokens / len(data):>15.1f} {outcome.completion_tokens / len(data):>12.2f} "
                f"{ratio:>11}"
            )
    for kind, n, score, generate, direct in rows:
        changed = sum(o.changed for o in (score, generate, direct) if o is not None)
        if changed:
            print(f"note: {kind} {n}-shot: {changed} predictions changed between repeats (batching numerics)")
    print()
    for kind, n, score, generate, _ in rows:
        ratio = score.texts_s(len(data)) / generate.texts_s(len(data))
        verdict = "met" if ratio >= 5 else "MISSED"
        print(f"{kind} {n}-shot: task score = {ratio:.2f}x task generate (target >= 5x): {verdict}")


if __name__ == "__main__":
    main()
