"""Latency the task layer adds: a TaskService RPC vs the calls a client would make itself to the tokenizer and
inference services for the same prompt, on one `genloom serve all` process (the task service reaches tokenizer
and inference over gRPC on its own port, as it does in that deployment).

Scenarios, one short input each, sequential requests (one in flight at a time):

- classify: Classify (SCORE, 3 labels, zero-shot) vs Tokenize(the task's chat prompt) + Score(those ids, the
  labels as candidates);
- answer: Answer (short context, max_new_tokens `--new-tokens`) vs Tokenize + Generate(the same ids, greedy, same
  max_new_tokens, logprobs as the task asks them);
- summarize: Summarize (short document, max_new_tokens `--new-tokens`) vs Tokenize + Generate.

The direct prompt is built with the task service's own prompt builders, and the first exchange checks that both
paths did the same work (same prompt token count; same label log-probabilities / the same generated text). Both
paths use raw gRPC stubs on one channel. Requests alternate task, direct, task, ...; the overhead is the median
(and p90) over `--repeats` adjacent pairs of (task - direct), so slow phases of a shared machine mostly cancel.
"added min" is min(task) - min(direct): other load on the machine only ever adds time, so the fastest runs of each
path are the least disturbed estimate of the work each path needs.

    python benchmarks/tasks.py [--engine hf] [--repeats 100] [--new-tokens 4] [--scenarios classify,answer,summarize]

Target (issue): the task layer adds <= 5 ms per request (median).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings
from genloom.services.tasks.context import sampling_for
from genloom.services.tasks.prompts import PromptSpec, answer_prompt, classify_prompt, summarize_prompt
from genloom.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

MODEL = "smollm2-135m-instruct"
LABELS = ["positive", "negative", "neutral"]
TEXTS = [
    "The hotel room was spotless and the staff were lovely.",
    "The delivery came three days late and the box was crushed.",
    "The museum opens at nine on weekdays.",
    "I loved the new album; every song is great.",
    "The laptop overheats and the battery dies within an hour.",
    "The train leaves from platform four.",
]
QUESTIONS = [
    ("Where does the train leave from?", "The night train to Vienna leaves from platform four at 21:40."),
    ("What colour is the door?", "The house at the end of the lane has a bright red door and a grey roof."),
    ("Who wrote the letter?", "The letter on the table was written by Marta, the baker's daughter, last spring."),
    ("How long is the bridge?", "The old stone bridge over the river is about 120 metres long."),
]
DOCUMENTS = [
    "The city council met on Tuesday to discuss the new bus routes. After a long debate, members agreed to add "
    "two lines to the northern districts and to run night buses on weekends. The changes start in March.",
    "A small bakery on Elm Street has won a regional prize for its rye bread. The owners, who opened the shop "
    "ten years ago, say the secret is a slow overnight rise and flour from a local mill.",
    "Heavy rain flooded several roads near the harbour on Sunday. No one was hurt, but traffic was diverted for "
    "hours and two ferries were cancelled. Crews expect the roads to reopen by Monday morning.",
]


@dataclass
class Stubs:
    tasks: tasks_pb2_grpc.TaskServiceStub
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub


@dataclass
class Scenario:
    name: str
    task: Callable[[int], Any]  # i -> response
    direct: Callable[[int], Any]
    check: Callable[[Any, Any], str]  # (task response, direct response) -> "" or what differs


def tokenize(stubs: Stubs, spec: PromptSpec) -> list[int]:
    """The prompt's ids as the task service gets them (chat template, no extra special tokens)."""
    request = tokenizer_pb2.TokenizeRequest(inputs=[spec.tokenizer_input(chat=True)], add_special_tokens=False)
    return list(stubs.tokenizer.Tokenize(request).results[0].ids)


def prompt_of(ids: list[int]) -> inference_pb2.Prompt:
    return inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=ids))


def classify_scenario(stubs: Stubs) -> Scenario:
    labels = [tasks_pb2.ClassLabel(name=name) for name in LABELS]

    def task(i: int) -> Any:
        request = tasks_pb2.ClassifyRequest(texts=[TEXTS[i % len(TEXTS)]], labels=labels)
        return stubs.tasks.Classify(request).results[0]

    def direct(i: int) -> Any:
        ids = tokenize(stubs, classify_prompt(TEXTS[i % len(TEXTS)], labels, []))
        item = inference_pb2.ScoreItem(prompt=prompt_of(ids), candidates=LABELS)
        return stubs.inference.Score(inference_pb2.ScoreRequest(items=[item])).results[0]

    def check(t: Any, d: Any) -> str:
        task_lp = [p.logprob for p in t.probabilities]
        direct_lp = [c.sum_logprob for c in d.candidates]
        if t.context.prompt_tokens != d.prompt_tokens:
            return f"prompt tokens {t.context.prompt_tokens} vs {d.prompt_tokens}"
        if any(abs(a - b) > 1e-3 for a, b in zip(task_lp, direct_lp, strict=True)):
            return f"label log-probabilities {task_lp} vs {direct_lp}"
        return ""

    return Scenario("classify", task, direct, check)


def generation_check(t: Any, d: Any) -> str:
    if t.context.prompt_tokens != d.usage.prompt_tokens:
        return f"prompt tokens {t.context.prompt_tokens} vs {d.usage.prompt_tokens}"
    if t.usage.completion_tokens != d.usage.completion_tokens:
        return f"completion tokens {t.usage.completion_tokens} vs {d.usage.completion_tokens}"
    return ""


def answer_scenario(stubs: Stubs, new_tokens: int) -> Scenario:
    sampling = inference_pb2.SamplingParams(max_new_tokens=new_tokens)
    # What the task sends: greedy, the caller's max_new_tokens, the sampled tokens' logprobs (to rank chunks).
    direct_sampling = sampling_for(sampling, new_tokens, (), logprobs=True)

    def task(i: int) -> Any:
        question, context = QUESTIONS[i % len(QUESTIONS)]
        request = tasks_pb2.AnswerRequest(
            items=[tasks_pb2.AnswerItem(question=question, context=context)], sampling=sampling
        )
        return stubs.tasks.Answer(request).results[0]

    def direct(i: int) -> Any:
        ids = tokenize(stubs, answer_prompt(*QUESTIONS[i % len(QUESTIONS)], []))
        return stubs.inference.Generate(inference_pb2.GenerateRequest(prompt=prompt_of(ids), sampling=direct_sampling))

    def check(t: Any, d: Any) -> str:
        return generation_check(t, d) or ("" if t.answer == d.text.strip() else f"{t.answer!r} vs {d.text!r}")

    return Scenario("answer", task, direct, check)


def summarize_scenario(stubs: Stubs, new_tokens: int) -> Scenario:
    sampling = inference_pb2.SamplingParams(max_new_tokens=new_tokens)
    direct_sampling = sampling_for(sampling, new_tokens)

    def task(i: int) -> Any:
        request = tasks_pb2.SummarizeRequest(documents=[DOCUMENTS[i % len(DOCUMENTS)]], sampling=sampling)
        return stubs.tasks.Summarize(request).results[0]

    def direct(i: int) -> Any:
        ids = tokenize(stubs, summarize_prompt(DOCUMENTS[i % len(DOCUMENTS)], []))
        return stubs.inference.Generate(inference_pb2.GenerateRequest(prompt=prompt_of(ids), sampling=direct_sampling))

    def check(t: Any, d: Any) -> str:
        return generation_check(t, d) or ("" if t.summary == d.text.strip() else f"{t.summary!r} vs {d.text!r}")

    return Scenario("summarize", task, direct, check)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run(scenario: Scenario, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """(task seconds, direct seconds), one pair per repeat, alternating which path goes first."""
    for i in range(warmup):
        problem = scenario.check(scenario.task(i), scenario.direct(i))
        if problem:
            raise SystemExit(f"{scenario.name}: the task and the direct calls did different work: {problem}")
    task_s, direct_s = [], []
    for i in range(repeats):
        order = ((task_s, scenario.task), (direct_s, scenario.direct))
        for samples, call in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call(i)
            samples.append(time.perf_counter() - start)
    return task_s, direct_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="hf", help="GENLOOM_ENGINE of the server (hf, vllm, auto)")
    parser.add_argument("--scenarios", default="classify,answer,summarize")
    parser.add_argument("--repeats", type=int, default=100, help="(task, direct) pairs per scenario")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured pairs first (also the equality checks)")
    parser.add_argument("--new-tokens", type=int, default=4, help="max_new_tokens of answer and summarize")
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (0 = the runtime's default)"
    )
    args = parser.parse_args()
    cache = Path(os.environ.get("GENLOOM_MODEL_CACHE") or ModelSettings().model_cache)
    ensure_default_model(cache, MODEL)
    env = {"GENLOOM_MODEL_CACHE": str(cache), "GENLOOM_ENGINE": args.engine, "GENLOOM_VLLM_CPU_KVCACHE_GIB": "2"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    rows = []
    with ServerProcess("all", ["--metrics-port", "-1"], env=env) as server, grpc.insecure_channel(server.target) as ch:
        stubs = Stubs(
            tasks_pb2_grpc.TaskServiceStub(ch),
            tokenizer_pb2_grpc.TokenizerServiceStub(ch),
            inference_pb2_grpc.InferenceServiceStub(ch),
        )
        builders = {
            "classify": lambda: classify_scenario(stubs),
            "answer": lambda: answer_scenario(stubs, args.new_tokens),
            "summarize": lambda: summarize_scenario(stubs, args.new_tokens),
        }
        for name in args.scenarios.split(","):
            task_s, direct_s = run(builders[name](), args.repeats, args.warmup)
            rows.append((name, task_s, direct_s))
            print(f"{name}: done ({args.repeats} pairs)", flush=True)

    print(
        f"\nengine {args.engine}, server threads {args.threads or 'default'}, {os.cpu_count()} CPUs, "
        f"{args.repeats} sequential (task, direct) pairs per scenario; milliseconds"
    )
    print(
        f"{'scenario':<10} {'task p50':>9} {'direct p50':>10} {'added p50':>9} {'added p90':>9} "
        f"{'added min':>9} {'task/direct':>11}"
    )
    verdicts = []
    for name, task_s, direct_s in rows:
        added = [(t - d) * 1000 for t, d in zip(task_s, direct_s, strict=True)]
        task_ms, direct_ms = statistics.median(task_s) * 1000, statistics.median(direct_s) * 1000
        print(
            f"{name:<10} {task_ms:>9.1f} {direct_ms:>10.1f} {statistics.median(added):>9.2f} "
            f"{percentile(added, 0.9):>9.2f} {(min(task_s) - min(direct_s)) * 1000:>9.2f} {task_ms / direct_ms:>10.3f}x"
        )
        p50 = statistics.median(added)
        verdicts.append(
            f"{name}: the task layer adds {p50:.2f} ms (median; target <= 5 ms): {'met' if p50 <= 5 else 'MISSED'}"
        )
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
