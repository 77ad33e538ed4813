"""`make demo`: start genloom on the default model, use it through the SDK, print the results, shut down.

Starts `genloom serve all` (every service on one port) as a child process on a free port and a `genloom worker`
(the Celery worker that trains fine-tuning jobs, through Redis), waits until they are ready, calls the server with
`genloom.Client` (tokenizer, inference, the task service: summarize, answer, classify; then a small LoRA
fine-tuning job on the default model, followed live, whose result is served by name through Classify), then stops
both with SIGTERM and checks that they exited cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import genloom
from genloom.services.server.process import ServerProcess
from genloom.types.tasks import ClassifyResult, ContextReport

SENTENCE = "genloom turns a language model into dependable task endpoints. Héllo, 世界!"
CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What does a tokenizer do?"},
]

# The task service's inputs: a short paragraph to summarize (and one worked example for one-shot), a passage to
# answer a question from, and texts to classify.
PARAGRAPH = (
    "The quarterly planning meeting moved from Monday to Friday because the large conference room was booked. "
    "Everyone must bring a laptop. The agenda covers the budget, hiring for the data team and the office move."
)
SUMMARY_EXAMPLE = (
    "The bakery on Elm Street will close for two weeks in August for renovations. It reopens on September 1 with "
    "a larger kitchen.",
    "The Elm Street bakery closes for August renovations and reopens September 1.",
)
PASSAGE = (
    "The Loom Bridge crosses the river Weft in the town of Heddle. It was built in 1887 by the guild of weavers, "
    "who paid for it with a tax on wool. The bridge is 140 metres long and was rebuilt in stone after the flood "
    "of 1924."
)
QUESTION = "Who built the Loom Bridge?"
REVIEWS = [
    "I love this film, it was wonderful and moving.",
    "Terrible acting, boring plot, a waste of time.",
    "The soundtrack was great but the story dragged on.",
]
LABELS = ["positive", "negative"]
# A small labelled set for the fine-tuning job: classify records, trained on the task service's own prompt.
TRAIN_POSITIVE = [
    "A delightful film with a warm heart.",
    "Brilliant performances from the whole cast.",
    "I enjoyed every minute of it.",
    "A beautiful, uplifting story.",
    "Funny, clever and touching.",
    "The best film I have seen this year.",
    "Gorgeous photography and a great score.",
    "A joy from start to finish.",
    "Smart writing and lovely characters.",
    "I would happily watch it again.",
    "An inspiring and moving experience.",
    "Charming, fresh and full of life.",
]
TRAIN_NEGATIVE = [
    "A dull and lifeless film.",
    "The acting was wooden and the plot made no sense.",
    "I walked out halfway through.",
    "Painfully slow and badly edited.",
    "A complete waste of two hours.",
    "Clumsy dialogue and flat characters.",
    "The worst film I have seen this year.",
    "Loud, messy and boring.",
    "Nothing works in this tired sequel.",
    "I regret buying a ticket.",
    "Predictable, shallow and far too long.",
    "An ugly, joyless mess.",
]


def main() -> int:
    print("starting `genloom serve all` on the default model (the model is converted on the first run, and the")
    print("inference engine loads and warms up: allow a minute)...")
    server = ServerProcess("all", ["--metrics-port", "-1"])
    log = Path(tempfile.mkdtemp(prefix="genloom-demo-")) / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "genloom.cli", "worker", "--hostname", "demo-worker@localhost"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    with server:
        print(f"serving on {server.target}; fine-tuning worker pid {worker.pid} (log: {log})\n")
        with genloom.Client(target=server.target) as client:
            info = client.tokenizer.info()
            print(f"model           {info.model}")
            print(f"context window  {info.context_window} tokens")
            print(f"vocabulary      {info.vocab_size} tokens")
            print("special tokens  " + ", ".join(f"{s.kind}={s.token}" for s in info.special_tokens))

            (tokenized,) = client.tokenizer.tokenize(SENTENCE, return_tokens=True).results
            print(f"\nsentence: {SENTENCE!r}")
            print(f"  {tokenized.count} tokens: {tokenized.ids}")
            round_trip = client.tokenizer.detokenize(tokenized.ids).texts[0]
            print(f"  detokenized back: {round_trip!r} ({'identical' if round_trip == SENTENCE else 'DIFFERENT'})")

            rendered = client.tokenizer.apply_chat_template(CHAT)
            print(f"\nchat of {len(CHAT)} messages rendered through the model's template ({rendered.count} tokens):")
            print("  " + rendered.text.replace("\n", "\n  ").rstrip())

            counts = client.tokenizer.count_tokens([SENTENCE, CHAT], reserve_tokens=256)
            print(f"\ncount_tokens: {counts.counts} (total {counts.total}); with 256 tokens reserved for the")
            print(f"answer, each fits the {counts.context_window}-token window: {counts.fits_context}")

            try:
                client.tokenizer.count_tokens(SENTENCE, model="no-such-model")
            except genloom.NotFoundError as err:
                print(f"\nan unknown model is a typed error: {type(err).__name__}: {err.message}")

            model = client.inference.model_info()
            print(f"\ninference: {model.name} on the {model.engine} engine ({model.dtype}, {model.device})")
            question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
            answer = client.inference.generate(question, max_new_tokens=32, temperature=0)
            print(f"  generate: {answer.text.strip()!r}")
            print(
                f"    ({answer.finish_reason}; {answer.usage.prompt_tokens} prompt + "
                f"{answer.usage.completion_tokens} generated tokens in {answer.timing.total:.2f}s)"
            )
            print("  stream:   ", end="", flush=True)
            with client.inference.stream(
                [{"role": "user", "content": "Name three colours."}], max_new_tokens=32, temperature=0
            ) as stream:
                for delta in stream:
                    print(delta.text.replace("\n", " "), end="", flush=True)
            print()
            scores = client.inference.score([("The capital of France is", [" Paris", " Berlin", " banana"])])
            ranked = sorted(
                zip(scores.results[0].candidates, (" Paris", " Berlin", " banana"), strict=True),
                key=lambda pair: -pair[0].sum_logprob,
            )
            print("  score:    " + ", ".join(f"{text.strip()} {c.sum_logprob:.2f}" for c, text in ranked))

            show_tasks(client)
            show_finetune(client, worker, log)
        print("\nstopping the worker and the server (SIGTERM)...")
        worker.send_signal(signal.SIGTERM)
        worker_code = worker.wait(timeout=120)
        print(f"worker exited with code {worker_code}")
    code = server.stop()
    print(f"server exited with code {code}")
    return code or worker_code


def wrap(text: str, indent: str = "    ") -> str:
    return textwrap.fill(" ".join(text.split()), width=110, initial_indent=indent, subsequent_indent=indent)


def context_line(context: ContextReport) -> str:
    return (
        f"{context.examples_used} of {context.examples_given} examples used, {context.prompt_tokens}-token prompt "
        f"of a {context.context_window}-token window, {context.model_calls} model call(s)"
    )


def classification_table(texts: list[str], results: list[ClassifyResult], calibrated: bool = False) -> None:
    print(f"    {'text':<52}" + "".join(f"{label:>10}" for label in LABELS) + "  -> label")
    for text, result in zip(texts, results, strict=True):
        row = f"    {text:<52}" + "".join(f"{p.probability:>10.3f}" for p in result.probabilities)
        row += f"  -> {result.label}"
        if calibrated:
            before = " / ".join(f"{p.uncalibrated_probability:.3f}" for p in result.probabilities)
            row += f"  (before calibration: {before})"
        print(row)


def show_tasks(client: genloom.Client) -> None:
    """Summarize, answer and classify through the task service (which calls the tokenizer and inference services)."""
    print("\ntasks (prompts built, measured against the context window and sent by the task service):")
    print(f"  document to summarize:\n{wrap(PARAGRAPH)}")
    zero = client.tasks.summarize(PARAGRAPH, target_words=20, max_new_tokens=48).results[0]
    print(f"  summarize, zero-shot ({context_line(zero.context)}):\n{wrap(zero.summary)}")
    one = client.tasks.summarize(PARAGRAPH, examples=[SUMMARY_EXAMPLE], target_words=20, max_new_tokens=48).results[0]
    print(f"  summarize, one-shot ({context_line(one.context)}):\n{wrap(one.summary)}")

    (answer,) = client.tasks.answer(QUESTION, context=PASSAGE, max_new_tokens=32).results
    print(f"\n  answer from a context passage:\n{wrap(PASSAGE)}")
    print(f"    question: {QUESTION!r}")
    scored_answer = f"{answer.answer!r} (mean token log-probability {answer.score:.2f})"
    print(textwrap.fill(scored_answer, width=110, initial_indent="    answer:   ", subsequent_indent=" " * 14))
    if answer.support is not None:
        support = answer.support
        print(
            f"    supported by chunk {support.chunk_index}, characters [{support.start}, {support.end}) of the passage:"
        )
        print(wrap(support.text, "      "))
        needle = answer.answer.strip().rstrip(".")
        found = PASSAGE.find(needle, support.start, support.end) if needle else -1
        if found >= 0:
            print(f"    the answer appears verbatim at characters [{found}, {found + len(needle)}) of the passage")

    print(f"\n  classify {len(REVIEWS)} texts (score method: the softmax of each label's log-probability):")
    scored = client.tasks.classify(REVIEWS, labels=LABELS)
    classification_table(REVIEWS, scored.results, calibrated=False)
    calibrated = client.tasks.classify(REVIEWS, labels=LABELS, calibrate=True)
    prior = ", ".join(f"{p.label} {p.content_free_probability:.3f}" for p in calibrated.results[0].probabilities)
    print(f"  the same with calibrate=True: divided by the content-free prior ({prior}), renormalized:")
    classification_table(REVIEWS, calibrated.results, calibrated=True)
    print(
        f"    ({scored.usage.prompt_tokens} prompt tokens without calibration, "
        f"{calibrated.usage.prompt_tokens} with its extra content-free scorings)"
    )


def wait_worker_ready(worker: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while b"ready." not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the fine-tuning worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def show_finetune(client: genloom.Client, worker: subprocess.Popen[bytes], log: Path) -> None:
    """A LoRA job on the default model through the queue, followed live, then served by name."""
    wait_worker_ready(worker, log)
    records = [{"text": t, "label": "positive"} for t in TRAIN_POSITIVE]
    records += [{"text": t, "label": "negative"} for t in TRAIN_NEGATIVE]
    records = [r for pair in zip(records[:12], records[12:], strict=True) for r in pair]  # interleaved
    print(f"\nfine-tuning: a LoRA job on {len(records)} labelled reviews (task records, in Classify's own prompt)")
    job = client.finetune.create(
        records,
        task="classify",
        task_options={"labels": LABELS},
        hyperparameters={"epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "lora_rank": 8, "max_seq_length": 256},
        validation_split=0.25,
        suffix="reviews",
    )
    print(f"  created {job.id} ({job.state}); following its events:")
    for event in client.finetune.watch(job.id):
        m = event.metrics
        if event.type == "metrics" and m is not None and m.train_loss is not None:
            eta = f", eta {m.eta_seconds:.0f}s" if m.eta_seconds is not None else ""
            rate = f", {m.tokens_per_second:.0f} tokens/s" if m.tokens_per_second else ""
            print(f"    step {m.step}/{m.total_steps}  loss {m.train_loss:.3f}{rate}{eta}")
        elif event.type != "metrics" or (m is not None and m.validation_loss is not None):
            print(f"    [{event.type}] {event.message}")
    job = client.finetune.wait(job.id).raise_for_status()
    print(f"  {job.state}: {job.result_model}")
    print(f"  {job.trained_tokens} tokens trained; best validation loss {job.best_validation_loss:.3f}")
    print("  classify through the fine-tuned model, by name (its adapter is hot-loaded by the inference service):")
    tuned = client.tasks.classify(REVIEWS, labels=LABELS, model=job.result_model)
    classification_table(REVIEWS, tuned.results)


if __name__ == "__main__":
    sys.exit(main())
