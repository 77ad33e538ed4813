"""Fine-tuning: training throughput of a LoRA job run through the service vs the same training in-process, and the
latency from CreateJob to JOB_STATE_RUNNING with an idle worker.

Everything is real: `genloom serve finetune` and `genloom worker` (python -m genloom.services.finetune.worker) as
child processes on Redis (`--redis-url`, default DB 12: keep it apart from the test suite's DB 13) with a queue
name of their own, and an artifact store in a temporary directory.

Throughput. A LoRA job (max_steps `--steps`, batch `--batch-size`, every example cut to exactly `--seq-len` tokens,
no validation, fp32, CPU, metrics every step as by default) vs plain transformers + PEFT in this process: Trainer
on get_peft_model with the same LoraConfig (PEFT's default targets, r 8, alpha 16, dropout 0.05), optimizer,
schedule, seed and batch size, on the very same token ids (both tokenized by genloom.services.finetune.data, the
baseline collated by transformers' DataCollatorForSeq2Seq). The rate is defined the same way on both sides:

    training tokens/s = (non-padding tokens seen at the last step - at the first step)
                        / (time of the last step's end - time of the first step's end)

so model loading, the first step (lazy initialisation) and the final save are outside it. The service's figure
comes from the job's own metrics events (their trained_tokens, and the seconds between them as
delta trained_tokens / tokens_per_second, which the worker measures with a monotonic clock); the baseline's from
a callback at on_step_end. The service's window therefore contains everything the worker does per step (the cancel
check, Trainer's per-step logging, publishing each metrics event to Redis). The end-to-end wall time (CreateJob
sent -> SUCCEEDED seen on WatchJob) and its parts are shown too. Runs alternate service, baseline, baseline,
service, ... over `--repeats` pairs so a noisy shared machine shows up as spread rather than bias; the ratio is
the median over pairs of service/baseline. The first pair also checks that both did the same work (equal token
counts and nearly equal adapter weights).

Latency. With the worker started and idle (after one unmeasured warm-up job, reported separately: a fresh
worker imports torch before it marks its first job running), `--latency-jobs` tiny jobs (random 2-layer Llama,
one step) are submitted one after another. For each: the RUNNING state-change event's created_at minus the
wall-clock time the client sent CreateJob, and the client-observed time until WatchJob delivered that event.

    python benchmarks/finetune.py [--model default|tiny] [--steps 20] [--batch-size 4] [--seq-len 128]
                                  [--repeats 3] [--threads N] [--latency-jobs 10] [--parts throughput,latency]

Targets (issue): service training tokens/s >= 0.95x the baseline; submit -> running <= 0.5 s (median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis

from genloom.services.models.registry import ModelRegistry
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

S = finetune_pb2
TINY = "bench-tiny-llama"
TERMINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}
LEARNING_RATE = 2e-4
SEED = 42
WORDS = (
    "river stone garden lamp window morning quiet bridge harbour letter winter orchard candle market silver village "
    "meadow thunder lantern compass journey forest painter kettle ribbon mountain cellar festival"
)
VOCABULARY = WORDS.split(" ")


@dataclass
class ServiceRun:
    """One job through the service."""

    tok_s: float
    window_tokens: int
    window_s: float
    event_window_s: float  # the same window by the events' created_at (wall clock, ms resolution)
    total_tokens: int
    e2e_s: float  # CreateJob sent -> SUCCEEDED delivered by WatchJob
    to_running_s: float  # CreateJob sent -> RUNNING event
    setup_s: float  # RUNNING event -> step 1 metrics event (model load, tokenizing, Trainer set-up, step 1)
    finish_s: float  # last metrics event -> SUCCEEDED event (final checkpoint, result saved, registered)
    result_path: str


@dataclass
class BaselineRun:
    """The same training in this process."""

    tok_s: float
    window_tokens: int
    window_s: float
    total_tokens: int
    e2e_s: float  # model load + Trainer set-up + training
    adapter: dict[str, Any]


@dataclass
class Workload:
    model_name: str
    model_path: Path
    jsonl: bytes
    steps: int
    batch_size: int
    seq_len: int


def build_tiny_model(default_dir: Path, path: Path) -> Path:
    """A random 2-layer Llama of width 64 with the default model's tokenizer: per-step overheads dominate it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((default_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)  # type: ignore[no-untyped-call]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (default_dir / name).is_file():
            shutil.copy(default_dir / name, path / name)
    return path


def make_jsonl(count: int, seed: int = 0) -> bytes:
    """Prompt/completion records whose completions run well past any --seq-len (cut to it: equal widths)."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        completion = " " + " ".join(rng.choice(VOCABULARY) for _ in range(400))
        lines.append(json.dumps({"prompt": f"Story {i}:", "completion": completion}))
    return ("\n".join(lines) + "\n").encode()


def hyperparameters(steps: int, batch_size: int, seq_len: int) -> finetune_pb2.Hyperparameters:
    return S.Hyperparameters(
        max_steps=steps,
        batch_size=batch_size,
        max_seq_length=seq_len,
        learning_rate=LEARNING_RATE,
        precision=S.PRECISION_FP32,
        seed=SEED,
        checkpoint_interval_steps=10_000,  # only the save Trainer always makes at the last step
    )


def job_spec(work: Workload) -> finetune_pb2.JobSpec:
    return S.JobSpec(
        base_model=work.model_name,
        training_data=S.TrainingDataSource(jsonl=work.jsonl),
        hyperparameters=hyperparameters(work.steps, work.batch_size, work.seq_len),
        suffix="bench",
        validation_split=0.0,
        truncate_long_examples=True,
    )


# -- the service ---------------------------------------------------------------------------------------------


class Worker:
    """`genloom worker` in a child process, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genloom.services.finetune.worker", "--hostname", self.hostname],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while b"ready." not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def service(env: dict[str, str], root: Path) -> Iterator[finetune_pb2_grpc.FineTuningServiceStub]:
    """`genloom serve finetune` and one worker, ready and idle."""
    with ServerProcess("finetune", ["--metrics-port", "-1"], env=env) as server:
        worker = Worker(env, root / "worker.log")
        try:
            worker.wait_ready()
            with grpc.insecure_channel(server.target) as channel:
                yield finetune_pb2_grpc.FineTuningServiceStub(channel)
        finally:
            worker.stop()


def follow(stub: finetune_pb2_grpc.FineTuningServiceStub, job_id: str) -> Iterator[tuple[float, finetune_pb2.JobEvent]]:
    """(perf_counter when delivered, event) for each of the job's events, up to its terminal state."""
    for response in stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=3600):
        yield time.perf_counter(), response.event


def seconds(timestamp: Any) -> float:
    return float(timestamp.ToNanoseconds()) / 1e9


def service_run(stub: finetune_pb2_grpc.FineTuningServiceStub, work: Workload) -> ServiceRun:
    sent_wall, sent = time.time(), time.perf_counter()
    job = stub.CreateJob(S.CreateJobRequest(spec=job_spec(work)), timeout=120).job
    events: list[finetune_pb2.JobEvent] = []
    done = sent
    for seen, event in follow(stub, job.id):
        events.append(event)
        done = seen
    final = stub.GetJob(S.GetJobRequest(job_id=job.id), timeout=60).job
    if final.state != S.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"the service's job {job.id} ended {S.JobState.Name(final.state)}: {final.error.message}")
    train = [e for e in events if e.type == S.JOB_EVENT_TYPE_METRICS and e.metrics.HasField("train_loss")]
    if [e.metrics.step for e in train] != list(range(1, work.steps + 1)):
        raise SystemExit(f"expected a metrics event per step, got steps {[e.metrics.step for e in train]}")
    window_tokens = train[-1].metrics.trained_tokens - train[0].metrics.trained_tokens
    window_s = 0.0
    for before, after in itertools.pairwise(train):
        window_s += (after.metrics.trained_tokens - before.metrics.trained_tokens) / after.metrics.tokens_per_second
    states = {e.state: e for e in events if e.type == S.JOB_EVENT_TYPE_STATE_CHANGE}
    running, succeeded = states[S.JOB_STATE_RUNNING], states[S.JOB_STATE_SUCCEEDED]
    return ServiceRun(
        tok_s=window_tokens / window_s,
        window_tokens=window_tokens,
        window_s=window_s,
        event_window_s=seconds(train[-1].created_at) - seconds(train[0].created_at),
        total_tokens=final.trained_tokens,
        e2e_s=done - sent,
        to_running_s=seconds(running.created_at) - sent_wall,
        setup_s=seconds(train[0].created_at) - seconds(running.created_at),
        finish_s=seconds(succeeded.created_at) - seconds(train[-1].created_at),
        result_path=final.result_path,
    )


# -- the baseline --------------------------------------------------------------------------------------------


def tokenized(work: Workload, cache: Path) -> list[Any]:
    """The training examples exactly as the worker gets them (same reader, same tokenizer, same split)."""
    from genloom.services.finetune import data
    from genloom.services.models.registry import ModelSpec
    from genloom.services.tokenizer.store import load_tokenizer

    report = data.read_examples(
        work.jsonl,
        file=data.TRAINING,
        tokenizer=load_tokenizer(ModelSpec(work.model_name, work.model_path)),
        data_format=data.PROMPT_COMPLETION,
        max_seq_length=work.seq_len,
        truncate=True,
    )
    if not report.ok:
        raise SystemExit(f"the benchmark's own data is invalid: {report.errors[:3]}")
    train, _ = data.split_validation(report.examples, 0.0, SEED)
    return list(train)


def baseline_run(work: Workload, examples: list[Any], out_dir: Path) -> BaselineRun:
    """transformers Trainer + PEFT LoRA in this process, timed by a callback."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks.append((time.monotonic(), int(state.num_input_tokens_seen)))

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(work.model_path))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(work.model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=work.steps,
        per_device_train_batch_size=work.batch_size,
        learning_rate=LEARNING_RATE,
        warmup_steps=math.ceil(0.03 * work.steps),  # the service's default warmup_ratio
        lr_scheduler_type="linear",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # as the worker does: no per-run summary on stdout
    trainer.train()
    e2e = time.perf_counter() - start
    (t0, n0), (t1, n1) = clock.marks[0], clock.marks[-1]
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return BaselineRun((n1 - n0) / (t1 - t0), n1 - n0, t1 - t0, n1, e2e, adapter)


def adapter_difference(service_result: str, baseline: dict[str, Any]) -> str:
    """Max |difference| between the service's saved adapter and the baseline's, or why it cannot be compared."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(service_result) / "adapter_model.safetensors"))
    if set(saved) != set(baseline):
        return f"different tensors ({len(saved)} vs {len(baseline)})"
    return f"{max(float((saved[k] - baseline[k]).abs().max()) for k in saved):.2e}"


# -- latency -------------------------------------------------------------------------------------------------


@dataclass
class Latency:
    event_s: float  # RUNNING event's created_at - CreateJob sent (wall clock)
    observed_s: float  # CreateJob sent -> RUNNING delivered by WatchJob (perf_counter)
    create_s: float  # the CreateJob RPC
    validated_s: float  # CreateJob sent -> QUEUED event
    picked_s: float  # QUEUED event -> RUNNING event


def latency_once(stub: finetune_pb2_grpc.FineTuningServiceStub, spec: finetune_pb2.JobSpec) -> Latency:
    sent_wall, sent = time.time(), time.perf_counter()
    job = stub.CreateJob(S.CreateJobRequest(spec=spec), timeout=60).job
    created = time.perf_counter()
    observed, states = 0.0, {}
    for seen, event in follow(stub, job.id):
        if event.type == S.JOB_EVENT_TYPE_STATE_CHANGE:
            states[event.state] = seconds(event.created_at)
            if event.state == S.JOB_STATE_RUNNING:
                observed = seen - sent
            if event.state in TERMINAL and event.state != S.JOB_STATE_SUCCEEDED:
                raise SystemExit(f"latency job {job.id} ended {S.JobState.Name(event.state)}: {event.message}")
    return Latency(
        event_s=states[S.JOB_STATE_RUNNING] - sent_wall,
        observed_s=observed,
        create_s=created - sent,
        validated_s=states[S.JOB_STATE_QUEUED] - sent_wall,
        picked_s=states[S.JOB_STATE_RUNNING] - states[S.JOB_STATE_QUEUED],
    )


def latency_spec() -> finetune_pb2.JobSpec:
    return S.JobSpec(
        base_model=TINY,
        training_data=S.TrainingDataSource(jsonl=make_jsonl(12, seed=1)),
        hyperparameters=hyperparameters(1, 4, 64),
        suffix="latency",
        validation_split=0.0,
        truncate_long_examples=True,
    )


# -- report --------------------------------------------------------------------------------------------------


def cleanup(url: str, artifact_root: Path, queue: str) -> None:
    """Remove what this run left in Redis: its jobs' keys and its queue (other keys in the DB are left alone)."""
    client = redis.Redis.from_url(url)
    mine = []
    ids: list[bytes] = client.zrange("genloom:ft:jobs", 0, -1)  # type: ignore[assignment]
    for raw_id in ids:
        job_id = raw_id.decode()
        raw = client.get(f"genloom:ft:job:{job_id}")
        if raw is None or S.Job.FromString(raw).spec.training_data.path.startswith(str(artifact_root)):
            mine.append(job_id)
    for pattern in [f"*{job_id}*" for job_id in mine] + [f"*{queue}*"]:
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    if mine:
        client.zrem("genloom:ft:jobs", *mine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "tiny"), default="default", help="model the LoRA job trains")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (every one is cut to it)")
    parser.add_argument("--repeats", type=int, default=3, help="(service, baseline) pairs, alternating the order")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of the worker and torch threads of the baseline (0 = the runtime's default)",
    )
    parser.add_argument("--latency-jobs", type=int, default=10, help="measured submissions (after one warm-up)")
    parser.add_argument("--latency-gap", type=float, default=1.0, help="seconds the worker idles before each one")
    parser.add_argument("--parts", default="latency,throughput")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("GENLOOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="Redis for the service and worker (a DB the test suite does not flush)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("GENLOOM_MODEL_CACHE") or ModelSettings().model_cache)
    default = ModelRegistry(ModelSettings(model_cache=cache)).resolve("")
    root = Path(tempfile.mkdtemp(prefix="genloom-bench-ft-"))
    tiny_dir = build_tiny_model(default.path, root / "tiny-llama")
    queue = f"bench-finetune-{uuid.uuid4().hex[:8]}"
    artifacts = root / queue  # job data paths start with it: how cleanup() tells this run's jobs apart
    env = {
        **os.environ,
        "GENLOOM_REDIS_URL": args.redis_url,
        "GENLOOM_MODEL_CACHE": str(cache),
        "GENLOOM_MODELS": f"{TINY}={tiny_dir}",
        "GENLOOM_FINETUNE_ARTIFACT_ROOT": str(artifacts),
        "GENLOOM_FINETUNE_QUEUE": queue,
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    name, path = (default.name, default.path) if args.model == "default" else (TINY, tiny_dir)
    work = Workload(name, path, make_jsonl(args.steps * args.batch_size), args.steps, args.batch_size, args.seq_len)
    print(
        f"model {name}, {args.steps} steps x batch {args.batch_size} x {args.seq_len} tokens, LoRA r8, fp32, "
        f"{os.cpu_count()} CPUs, threads {args.threads or 'default'} (torch {torch.get_num_threads()} here), "
        f"Redis {args.redis_url}, queue {queue}",
        flush=True,
    )

    verdicts = []
    try:
        with service(env, root) as stub:
            if "latency" in parts:
                spec = latency_spec()
                cold = latency_once(stub, spec)
                print(
                    f"\nlatency: first job on the fresh worker (warm-up, not counted): {cold.event_s:.3f} s to RUNNING"
                )
                runs = []
                for _ in range(args.latency_jobs):
                    time.sleep(args.latency_gap)
                    runs.append(latency_once(stub, spec))
                print(f"submit -> RUNNING with an idle worker, {len(runs)} jobs (seconds)")
                print(f"{'':<34} {'median':>8} {'max':>8} {'min':>8}")
                for label, values in (
                    ("RUNNING event created_at - sent", [r.event_s for r in runs]),
                    ("RUNNING seen on WatchJob - sent", [r.observed_s for r in runs]),
                    ("  of which CreateJob RPC", [r.create_s for r in runs]),
                    ("  sent -> QUEUED (validation)", [r.validated_s for r in runs]),
                    ("  QUEUED -> RUNNING (pick-up)", [r.picked_s for r in runs]),
                ):
                    print(f"{label:<34} {statistics.median(values):>8.3f} {max(values):>8.3f} {min(values):>8.3f}")
                p50 = statistics.median(r.event_s for r in runs)
                seen = statistics.median(r.observed_s for r in runs)
                verdicts.append(
                    f"submit -> running: median {p50:.3f} s by the event, {seen:.3f} s seen by the client "
                    f"(target <= 0.5 s): {'met' if max(p50, seen) <= 0.5 else 'MISSED'}"
                )
            if "throughput" in parts:
                examples = tokenized(work, cache)
                pairs: list[tuple[ServiceRun, BaselineRun]] = []
                print(f"\n{'run':<4} {'side':<9} {'tok/s':>8} {'window s':>9} {'tokens':>7} {'e2e s':>7}  parts")
                for r in range(args.repeats):
                    got: dict[str, Any] = {}
                    for side in ("service", "baseline") if r % 2 == 0 else ("baseline", "service"):
                        if side == "service":
                            s = got["service"] = service_run(stub, work)
                            print(
                                f"{r:<4} {side:<9} {s.tok_s:>8.1f} {s.window_s:>9.2f} {s.window_tokens:>7} "
                                f"{s.e2e_s:>7.2f}  to RUNNING {s.to_running_s:.2f}, set-up+step 1 {s.setup_s:.2f}, "
                                f"last step->SUCCEEDED {s.finish_s:.2f}; window by event clock {s.event_window_s:.2f}",
                                flush=True,
                            )
                        else:
                            b = got["baseline"] = baseline_run(work, examples, root / f"baseline-{r}")
                            print(
                                f"{r:<4} {side:<9} {b.tok_s:>8.1f} {b.window_s:>9.2f} {b.window_tokens:>7} "
                                f"{b.e2e_s:>7.2f}  (load + train, in-process)",
                                flush=True,
                            )
                    s, b = got["service"], got["baseline"]
                    if r == 0:
                        same = "same" if s.total_tokens == b.total_tokens else "DIFFERENT"
                        print(
                            f"     same work? tokens trained {s.total_tokens} vs {b.total_tokens} ({same}); "
                            f"adapter weights max |diff| {adapter_difference(s.result_path, b.adapter)}"
                        )
                    b.adapter.clear()
                    pairs.append((s, b))
                ratios = [s.tok_s / b.tok_s for s, b in pairs]
                per_step_ms = [(s.window_s - b.window_s) / (args.steps - 1) * 1000 for s, b in pairs]
                best = max(s.tok_s for s, _ in pairs) / max(b.tok_s for _, b in pairs)
                print(
                    f"\nservice/baseline tokens/s per pair: {', '.join(f'{x:.3f}' for x in ratios)}; "
                    f"median {statistics.median(ratios):.3f}x, best/best {best:.3f}x; service adds "
                    f"{statistics.median(per_step_ms):.1f} ms per step (median)"
                )
                print(
                    f"end to end: service {statistics.median(s.e2e_s for s, _ in pairs):.2f} s "
                    f"(CreateJob -> SUCCEEDED), baseline {statistics.median(b.e2e_s for _, b in pairs):.2f} s "
                    f"(load + train, no save)"
                )
                ratio = statistics.median(ratios)
                verdicts.append(
                    f"training throughput: {ratio:.3f}x the in-process baseline (median of {len(pairs)} pairs; "
                    f"target >= 0.95x): {'met' if ratio >= 0.95 else 'MISSED'}"
                )
    finally:
        cleanup(args.redis_url, artifacts, queue)
        shutil.rmtree(root, ignore_errors=True)
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
