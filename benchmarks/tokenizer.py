"""Tokenizer throughput: a 1,000-document batch through gRPC (SDK -> server) vs `tokenizers` in-process.

Prints throughput ratios against the in-process baseline measured in the same run (target: gRPC >= 0.8x).

    python benchmarks/tokenizer.py [--docs 1000] [--repeats 7] [--words 300]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer

import genloom
from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings

MODEL = "smollm2-135m-instruct"
_VOCABULARY = """
the model reads a document and writes a short summary of what
it says about prices markets weather science people cities history music games
code data servers tokens batches latency throughput résumé naïve café 東京
"""
WORDS = _VOCABULARY.split()


def make_documents(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        n = rng.randint(words // 2, words * 3 // 2)
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        docs.append(f"Document {i}. {sentence.capitalize()}.")
    return docs


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--words", type=int, default=300, help="mean words per document")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    cache = Path(os.environ.get("GENLOOM_MODEL_CACHE") or ModelSettings().model_cache)
    model_dir = ensure_default_model(cache, MODEL)
    docs = make_documents(args.docs, args.words)
    backend = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    server = ServerProcess("tokenizer", ["--tokenizer-max-batch", "100000"], env={"GENLOOM_MODEL_CACHE": str(cache)})
    with server, genloom.Client(target=server.target, timeout=600) as client:
        expected = [e.ids for e in backend.encode_batch(docs)]
        got = client.tokenizer.tokenize(docs).results
        assert [r.ids for r in got] == expected, "gRPC and in-process tokenizations differ"
        tokens = sum(len(ids) for ids in expected)
        # The baseline yields what the gRPC call yields: every document's ids as Python lists.
        rows = [
            (
                "in-process encode_batch + ids (baseline)",
                timed(lambda: [e.ids for e in backend.encode_batch(docs)], args.repeats),
            ),
            ("gRPC Tokenize via SDK (ids)", timed(lambda: client.tokenizer.tokenize(docs), args.repeats)),
            ("gRPC CountTokens via SDK", timed(lambda: client.tokenizer.count_tokens(docs), args.repeats)),
            (
                "in-process encode_batch alone (ids left in Rust)",
                timed(lambda: backend.encode_batch(docs), args.repeats),
            ),
        ]

    baseline = rows[0][1]
    print(f"{args.docs} documents, {tokens} tokens, median of {args.repeats} runs")
    print(f"{'path':<48} {'seconds':>8} {'tokens/s':>12} {'vs baseline':>12}")
    for name, seconds in rows:
        print(f"{name:<48} {seconds:>8.3f} {tokens / seconds:>12,.0f} {baseline / seconds:>11.2f}x")
    ratio = baseline / rows[1][1]
    print(
        f"gRPC Tokenize throughput = {ratio:.2f}x in-process (target >= 0.80x): {'met' if ratio >= 0.8 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
