"""The `genloom` command: run servers (`genloom serve`) and call them (`genloom tokenize`, `genloom classify`, ...)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from genloom._client import Client
from genloom._exceptions import APIStatusError
from genloom.types.finetune import (
    FineTuneJob,
    FineTuneSpec,
    FloatRange,
    Hyperparameters,
    IntRange,
    JobError,
    JobEvent,
    JobMetrics,
    Sweep,
    parse_hyperparameter,
)
from genloom.types.inference import Usage
from genloom.types.tasks import (
    ContextReport,
    EvalConfiguration,
    EvalPrediction,
    EvalProgress,
    EvalRecord,
    EvalSummary,
    SummarizeFinish,
    SummarizeProgress,
    SummaryDelta,
    read_eval_records,
)

app = typer.Typer(
    name="genloom",
    help="genloom: language-model task endpoints and fine-tuning over gRPC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Connection:
    def __init__(self, target: str | None, api_key: str | None, timeout: float) -> None:
        self.target, self.api_key, self.timeout = target, api_key, timeout

    def client(self) -> Client:
        return Client(target=self.target, api_key=self.api_key, timeout=self.timeout)


@app.callback()
def main_options(
    ctx: typer.Context,
    target: Annotated[
        str | None, typer.Option(envvar="GENLOOM_TARGET", help="Server address (default 127.0.0.1:50051).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="GENLOOM_API_KEY", help="API key, if the server requires one.")
    ] = None,
    timeout: Annotated[float, typer.Option(envvar="GENLOOM_TIMEOUT", help="Seconds to wait for each call.")] = 60.0,
) -> None:
    ctx.obj = _Connection(target, api_key, timeout)


def _fail(err: APIStatusError) -> NoReturn:
    typer.echo(f"error: {err}", err=True)
    for violation in err.field_violations:
        typer.echo(f"  {violation.field}: {violation.description}", err=True)
    raise typer.Exit(1)


def _inputs(texts: list[str], files: list[Path], chat: bool) -> list[Any]:
    items: list[str] = list(texts) + [f.read_text() for f in files]
    if not items and not sys.stdin.isatty():
        items = [sys.stdin.read()]
    if not items:
        raise typer.BadParameter("give TEXT arguments, --file, or text on standard input")
    return [[{"role": "user", "content": t}] for t in items] if chat else list(items)


TextsArg = Annotated[Optional[list[str]], typer.Argument(help="Texts (none: read --file or standard input).")]  # noqa: UP045
FilesOpt = Annotated[
    list[Path], typer.Option("--file", "-f", exists=True, dir_okay=False, help="Read a text from a file (repeatable).")
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (default: the server's default model).")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Send each text as a user message through the chat template.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def tokenize(
    ctx: typer.Context,
    texts: TextsArg = None,
    file: FilesOpt = [],  # noqa: B006 - typer needs a literal default
    model: ModelOpt = "",
    chat: ChatOpt = False,
    tokens: Annotated[bool, typer.Option("--tokens", help="Show each token's string form.")] = False,
    offsets: Annotated[bool, typer.Option("--offsets", help="Show each token's character span.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize texts and print their token ids."""
    with ctx.obj.client() as client:
        try:
            result = client.tokenizer.tokenize(
                _inputs(texts or [], file, chat), model=model, return_tokens=tokens, return_offsets=offsets
            )
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    for i, r in enumerate(result.results):
        typer.echo(f"[{i}] {r.count} tokens: {r.ids}")
        if tokens:
            typer.echo(f"    tokens: {r.tokens}")
        if offsets:
            typer.echo(f"    offsets: {r.offsets}")


@app.command("count-tokens")
def count_tokens(
    ctx: typer.Context,
    texts: TextsArg = None,
    file: FilesOpt = [],  # noqa: B006
    model: ModelOpt = "",
    chat: ChatOpt = False,
    reserve: Annotated[int, typer.Option(help="Tokens to keep free for generation when checking the fit.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Count tokens per text and check each against the model's context window."""
    with ctx.obj.client() as client:
        try:
            result = client.tokenizer.count_tokens(
                _inputs(texts or [], file, chat), model=model, reserve_tokens=reserve
            )
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result)))
        return
    for i, (count, fits) in enumerate(zip(result.counts, result.fits_context, strict=True)):
        typer.echo(f"[{i}] {count} tokens{'' if fits else '  (does not fit)'}")
    typer.echo(f"total {result.total} tokens; model {result.model}, context window {result.context_window}")


@app.command("tokenizer-info")
def tokenizer_info(ctx: typer.Context, model: ModelOpt = "", as_json: JsonOpt = False) -> None:
    """Show a model's vocabulary size, special tokens and context window."""
    with ctx.obj.client() as client:
        try:
            info = client.tokenizer.info(model=model)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(info), ensure_ascii=False))
        return
    typer.echo(f"model           {info.model}")
    typer.echo(f"vocab size      {info.vocab_size}")
    typer.echo(f"context window  {info.context_window}")
    typer.echo(f"chat template   {'yes' if info.has_chat_template else 'no'}")
    typer.echo("special tokens  " + ", ".join(f"{s.kind}={s.token!r}({s.id})" for s in info.special_tokens))


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="The prompt (none: read standard input).")] = None,
    model: ModelOpt = "",
    adapter: Annotated[str, typer.Option(help="A loaded LoRA adapter's name.")] = "",
    chat: Annotated[
        bool,
        typer.Option(
            "--chat/--raw", help="Send the prompt as a user message through the chat template (default) or as raw text."
        ),
    ] = True,
    system: Annotated[str | None, typer.Option(help="A system message (with --chat).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str], typer.Option(help="Stop sequence (repeatable).")] = [],  # noqa: B006
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate a completion with the inference service."""
    text = prompt if prompt is not None else sys.stdin.read()
    prompt_value: Any = text
    if chat:
        prompt_value = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    options: dict[str, Any] = dict(
        model=model,
        adapter=adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
    )
    with ctx.obj.client() as client:
        try:
            if stream:
                with client.inference.stream(prompt_value, **options) as events:
                    for delta in events:
                        typer.echo(delta.text, nl=False)
                    typer.echo()
                    finish = events.finish
                if finish is not None:
                    typer.echo(
                        f"[{finish.finish_reason}; {finish.usage.prompt_tokens} prompt + "
                        f"{finish.usage.completion_tokens} generated tokens]",
                        err=True,
                    )
                return
            result = client.inference.generate(prompt_value, **options)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    typer.echo(result.text)
    typer.echo(
        f"[{result.finish_reason}; {result.usage.prompt_tokens} prompt + "
        f"{result.usage.completion_tokens} generated tokens; {result.timing.total:.2f}s]",
        err=True,
    )


@app.command()
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the models the inference service serves."""
    with ctx.obj.client() as client:
        try:
            listed = client.inference.models()
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps([asdict(m) for m in listed]))
        return
    for m in listed:
        typer.echo(
            f"{m.name}{' (default)' if m.is_default else ''}  {m.kind}  engine={m.engine}  "
            f"context={m.context_window}  {'ready' if m.ready else 'NOT READY'}"
        )


# --- task commands -----------------------------------------------------------------------------------------------


class _StrategyChoice(str, enum.Enum):
    """--strategy values."""

    zero_shot = "zero-shot"
    one_shot = "one-shot"
    few_shot = "few-shot"


class _MethodChoice(str, enum.Enum):
    """--method values of classify."""

    score = "score"
    generate = "generate"


class _TaskChoice(str, enum.Enum):
    """--task values of eval."""

    classify = "classify"
    summarize = "summarize"
    answer = "answer"


AdapterOpt = Annotated[str, typer.Option(help="A loaded LoRA adapter's name.")]
StrategyOpt = Annotated[
    Optional[_StrategyChoice],  # noqa: UP045 - typer reads module-level annotations at run time
    typer.Option(help="Prompting strategy (default: zero-shot without --examples, else one- or few-shot)."),
]
MaxExamplesOpt = Annotated[int, typer.Option(help="Most examples with few-shot (0: as many as fit).")]
InstructionOpt = Annotated[Optional[str], typer.Option(help="Replace the built-in task instruction.")]  # noqa: UP045
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(help="Tokens to generate at most (default: the task's).")]  # noqa: UP045
TemperatureOpt = Annotated[Optional[float], typer.Option(help="Sampling temperature (default 0: greedy).")]  # noqa: UP045
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]  # noqa: UP045


def _read_text(path: str) -> str:
    """A file's text, or standard input for "-"."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}") from None


def _read_records(path: str | Path, task: str, option: str) -> list[EvalRecord]:
    """The records of a local JSONL file (the EvalDataset format), or a usage error naming file and line."""
    try:
        return read_eval_records(path, task)  # type: ignore[arg-type]
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}", param_hint=option) from None
    except ValueError as err:
        raise typer.BadParameter(f"{path}: {err}", param_hint=option) from None


def _split_list(value: str, option: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter("give a comma-separated list", param_hint=option)
    return items


def _report_line(finish_reason: str | None, context: ContextReport, usage: Usage, extra: Sequence[str] = ()) -> str:
    """The "[...]" line task commands print to standard error."""
    parts = [*extra]
    if finish_reason and finish_reason != "unspecified":
        parts.append(finish_reason)
    parts.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens")
    if context.chunks > 1:
        rounds = f", {context.reduce_rounds} reduce rounds" if context.reduce_rounds else ""
        parts.append(f"{context.chunks} chunks of {context.chunk_tokens} tokens{rounds}")
    if context.truncated:
        parts.append(f"truncated {context.removed_tokens} tokens on the {context.truncation_side}")
    if context.examples_given:
        parts.append(f"{context.examples_used} of {context.examples_given} examples used")
    return "[" + "; ".join(parts) + "]"


def _event_json(event: Any) -> str:
    kind = {SummarizeProgress: "progress", SummaryDelta: "delta", SummarizeFinish: "finish"}[type(event)]
    return json.dumps({"type": kind, **asdict(event)}, ensure_ascii=False)


@app.command()
def summarize(
    ctx: typer.Context,
    files: Annotated[list[str], typer.Argument(help="Documents to summarize: files, or - for standard input.")],
    words: Annotated[int | None, typer.Option(help="Target length: about this many words.")] = None,
    sentences: Annotated[int | None, typer.Option(help="Target length: about this many sentences.")] = None,
    bullets: Annotated[bool, typer.Option("--bullets", help="A bullet list instead of prose.")] = False,
    strategy: StrategyOpt = None,
    examples: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help='JSONL file of worked examples, {"document": ..., "summary": ...} per line.'),
    ] = None,
    max_examples: MaxExamplesOpt = 0,
    instruction: InstructionOpt = None,
    model: ModelOpt = "",
    adapter: AdapterOpt = "",
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print the summary as it is generated (one FILE).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Summarize documents with the task service (long ones are chunked and summarized map/reduce)."""
    if words is not None and sentences is not None:
        raise typer.BadParameter("give --words or --sentences, not both")
    if stream and len(files) != 1:
        raise typer.BadParameter("--stream summarizes one FILE")
    documents = [_read_text(f) for f in files]
    options: dict[str, Any] = dict(
        model=model,
        adapter=adapter,
        strategy=strategy.value if strategy else None,
        examples=_read_records(examples, "summarize", "--examples") if examples else (),
        max_examples=max_examples,
        target_words=words,
        target_sentences=sentences,
        format="bullets" if bullets else "prose",
        instruction=instruction,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    with ctx.obj.client() as client:
        try:
            if stream:
                with client.tasks.summarize_stream(documents[0], **options) as events:
                    for event in events:
                        if as_json:
                            typer.echo(_event_json(event))
                        elif isinstance(event, SummaryDelta):
                            typer.echo(event.text, nl=False)
                        elif isinstance(event, SummarizeProgress):
                            round_note = f" (round {event.reduce_round})" if event.reduce_round else ""
                            typer.echo(f"[{event.stage}{round_note}: {event.done}/{event.total}]", err=True)
                    finish = events.finish
                if finish is not None and not as_json:
                    typer.echo()
                    typer.echo(_report_line(finish.finish_reason, finish.context, finish.usage), err=True)
                return
            result = client.tasks.summarize(documents, **options)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    for name, summary in zip(files, result.results, strict=True):
        if len(files) > 1:
            typer.echo(f"== {name} ==")
        typer.echo(summary.summary)
        typer.echo(_report_line(summary.finish_reason, summary.context, summary.usage), err=True)


@app.command()
def answer(
    ctx: typer.Context,
    questions: Annotated[list[str], typer.Argument(help="Questions (each gets its own answer).")],
    context: Annotated[
        str | None,
        typer.Option(
            "--context", "-c", help="File with the passage to answer from (- for standard input); none: closed-book."
        ),
    ] = None,
    unanswerable: Annotated[
        bool, typer.Option("--unanswerable", help="Let the model say the context does not answer the question.")
    ] = False,
    strategy: StrategyOpt = None,
    examples: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help='JSONL file of worked examples, {"question", "context", "answer"} per line.'),
    ] = None,
    max_examples: MaxExamplesOpt = 0,
    instruction: InstructionOpt = None,
    model: ModelOpt = "",
    adapter: AdapterOpt = "",
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer questions with the task service, from a context passage or closed-book."""
    passage = _read_text(context) if context is not None else None
    with ctx.obj.client() as client:
        try:
            result = client.tasks.answer(
                questions,
                context=passage,
                allow_unanswerable=unanswerable,
                strategy=strategy.value if strategy else None,
                examples=_read_records(examples, "answer", "--examples") if examples else (),
                max_examples=max_examples,
                instruction=instruction,
                model=model,
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    for i, item in enumerate(result.results):
        prefix = f"[{i}] " if len(result.results) > 1 else ""
        typer.echo(prefix + ("(unanswerable: the context does not answer this)" if item.unanswerable else item.answer))
        extra = [f"score {item.score:.3f}"]
        if item.support is not None and item.context.chunks > 1:
            extra.append(f"from chunk {item.support.chunk_index} (characters {item.support.start}-{item.support.end})")
        typer.echo(_report_line(item.finish_reason, item.context, item.usage, extra), err=True)


@app.command()
def classify(
    ctx: typer.Context,
    labels: Annotated[str, typer.Option("--labels", "-l", help="Comma-separated label names, e.g. pos,neg.")],
    texts: TextsArg = None,
    file: FilesOpt = [],  # noqa: B006
    multi_label: Annotated[bool, typer.Option("--multi-label", help="Any number of labels per text.")] = False,
    method: Annotated[
        _MethodChoice, typer.Option(help="score: rank labels by likelihood; generate: map generated text to a label.")
    ] = _MethodChoice.score,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Contextual calibration against content-free inputs (score).")
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(help="Multi-label: assign labels with at least this probability (default 0.5)."),
    ] = None,
    strategy: StrategyOpt = None,
    examples: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help='JSONL file of worked examples, {"text", "label"} per line.'),
    ] = None,
    max_examples: MaxExamplesOpt = 0,
    instruction: InstructionOpt = None,
    model: ModelOpt = "",
    adapter: AdapterOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Classify texts with the task service and show every label's probability."""
    names = _split_list(labels, "--labels")
    items = _inputs(texts or [], file, chat=False)
    with ctx.obj.client() as client:
        try:
            result = client.tasks.classify(
                items,
                labels=names,
                multi_label=multi_label,
                method=method.value,
                calibrate=calibrate,
                threshold=threshold,
                strategy=strategy.value if strategy else None,
                examples=_read_records(examples, "classify", "--examples") if examples else (),
                max_examples=max_examples,
                instruction=instruction,
                model=model,
                adapter=adapter,
            )
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    width = max(len(n) for n in names)
    for i, (text, item) in enumerate(zip(items, result.results, strict=True)):
        assigned = ", ".join(item.labels) if item.labels else "(no label)"
        preview = " ".join(str(text).split())
        preview = preview if len(preview) <= 60 else preview[:59] + "…"
        typer.echo(f"[{i}] {assigned}    {preview}")
        for p in item.probabilities:
            mark = "*" if p.label in item.labels else " "
            typer.echo(f"  {mark} {p.label.ljust(width)}  {p.probability:6.3f}  {'#' * round(p.probability * 30)}")
    typer.echo(f"[{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} generated tokens]", err=True)


_EVAL_METRICS = {
    "classify": ("accuracy", "macro_f1"),
    "summarize": ("rouge1", "rouge2", "rouge_l"),
    "answer": ("exact_match", "token_f1"),
}
_ALL_METRICS = {name for names in _EVAL_METRICS.values() for name in names}


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(item) for item in _split_list(value, option)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated whole numbers, got {value!r}", param_hint=option) from None
    if any(n < 0 for n in numbers):
        raise typer.BadParameter("shot counts are 0 or more", param_hint=option)
    return numbers


def _eval_configurations(
    shots: Sequence[int], models: Sequence[str], methods: Sequence[str | None], adapter: str, calibrate: bool
) -> list[EvalConfiguration]:
    """One configuration per (model, method, shots), in that nesting order. Calibration applies to the score
    method only (the server refuses it with generate)."""
    return [
        EvalConfiguration(
            shots=n,
            model=model,
            adapter=adapter,
            method=method,  # type: ignore[arg-type]
            calibrate=calibrate and method in (None, "score"),
        )
        for model in models
        for method in methods
        for n in shots
    ]


def _eval_table(task: str, summary: EvalSummary) -> list[str]:
    """The results table of `genloom eval`: one row per configuration, the best marked with '*'."""
    metrics = _EVAL_METRICS.get(task, ())
    headers = ["", "configuration", "items", *metrics, "examples", "latency", "tokens"]
    rows = []
    for r in summary.results:
        m = r.metrics
        values = [m.metric(name) for name in metrics]
        rows.append(
            [
                "*" if r.configuration_index == summary.best_configuration_index else "",
                r.name,
                f"{m.items}" + (f" ({m.items_failed} failed)" if m.items_failed else ""),
                *("-" if v is None else f"{v:.3f}" for v in values),
                f"{m.mean_examples_used:.1f}",
                f"{m.mean_latency_s:.2f}s",
                f"{m.usage.total_tokens}",
            ]
        )
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


class _EvalProgressDisplay:
    """A progress bar per configuration on standard error: rich's when it is installed, else a plain line."""

    def __init__(self, configurations: int) -> None:
        self.configurations = configurations
        self._bars: dict[int, Any] = {}
        self._progress: Any = None
        self._last_line = ""
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )

    def __enter__(self) -> _EvalProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line:
            typer.echo(err=True)

    def update(self, event: EvalProgress) -> None:
        label = f"[{event.configuration_index + 1}/{self.configurations}] {event.configuration_name}"
        failed = f"{event.items_failed} failed" if event.items_failed else ""
        if self._progress is None:
            line = f"\r{label}  {event.items_done}/{event.items_total} {failed}"
            if line != self._last_line:
                typer.echo(line, nl=False, err=True)
                self._last_line = line
            return
        bar = self._bars.get(event.configuration_index)
        if bar is None:
            bar = self._bars[event.configuration_index] = self._progress.add_task(
                label, total=event.items_total, failed=failed
            )
        self._progress.update(bar, completed=event.items_done, total=event.items_total, failed=failed)


# Paragraphs on one line each: typer keeps a help text's line breaks.
_EVAL_HELP = "\n\n".join(
    [
        "Compare prompting strategies (shots), models and methods on a labeled dataset.",
        "One configuration per --shots value (times each --model and --method): a progress bar while they run, "
        "then a table of their metrics with the best marked.",
        'DATA.jsonl has one JSON object per line. classify: {"text", "label"} or {"text", "labels": [...]}. '
        'summarize: {"document", "summary"}. answer: {"question", "context"?, "answer"?, "answers"?: [...], '
        '"unanswerable"?: true|false}.',
        "The file is read here and its records sent with the request (--server-path: the server reads it "
        "instead). The evaluation runs without a deadline; Ctrl-C cancels it.",
    ]
)


@app.command("eval", help=_EVAL_HELP)
def eval_command(
    ctx: typer.Context,
    data: Annotated[
        str, typer.Argument(metavar="DATA.jsonl", help="The labeled dataset: a JSONL file (format above).")
    ],
    task: Annotated[_TaskChoice, typer.Option("--task", "-t", help="The task the dataset is for.")],
    shots: Annotated[str, typer.Option(help="Comma-separated example counts, one configuration each.")] = "0",
    holdout: Annotated[int, typer.Option(help="Use the dataset's first N records as examples (not scored).")] = 0,
    examples: Annotated[
        str | None,
        typer.Option(help="JSONL file of examples to draw shots from (instead of --holdout)."),
    ] = None,
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="Model to evaluate (repeatable; default: the server's).")
    ] = [],  # noqa: B006
    adapter: AdapterOpt = "",
    method: Annotated[
        str | None,
        typer.Option(help="Classify: comma-separated methods to compare, score and/or generate."),
    ] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Classify: calibrate the score method.")] = False,
    labels: Annotated[
        str | None,
        typer.Option(help="Classify: comma-separated labels (default: those in the data)."),
    ] = None,
    multi_label: Annotated[bool, typer.Option("--multi-label", help="Classify: several labels per text.")] = False,
    words: Annotated[int | None, typer.Option(help="Summarize: target words.")] = None,
    sentences: Annotated[int | None, typer.Option(help="Summarize: target sentences.")] = None,
    bullets: Annotated[bool, typer.Option("--bullets", help="Summarize: bullet lists.")] = False,
    unanswerable: Annotated[
        bool, typer.Option("--unanswerable", help="Answer: let the model say a question is unanswerable.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Score at most the first N items (0: all).")] = 0,
    concurrency: Annotated[int, typer.Option(help="Items in flight per configuration (0: server default).")] = 0,
    server_path: Annotated[
        bool,
        typer.Option("--server-path", help="DATA and --examples are paths on the server (not read here)."),
    ] = False,
    predictions: Annotated[
        Path | None,
        typer.Option(dir_okay=False, writable=True, help="Write every item's prediction to this JSONL file."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare prompting strategies (shots), models and methods on a labeled dataset."""
    task_name = task.value
    if holdout and examples:
        raise typer.BadParameter("give --holdout or --examples, not both")
    methods: list[str | None] = [None]
    if method is not None:
        if task_name != "classify":
            raise typer.BadParameter("--method is for --task classify", param_hint="--method")
        methods = list(_split_list(method, "--method"))
        for m in methods:
            if m not in ("score", "generate"):
                raise typer.BadParameter(f"unknown method {m!r} (score or generate)", param_hint="--method")
    if words is not None and sentences is not None:
        raise typer.BadParameter("give --words or --sentences, not both")
    configurations = _eval_configurations(_int_list(shots, "--shots"), model or [""], methods, adapter, calibrate)
    dataset: Any = data if server_path else _read_records(data, task_name, "DATA.jsonl")
    example_split: Any = None
    if examples is not None:
        example_split = examples if server_path else _read_records(examples, task_name, "--examples")
    with ctx.obj.client() as client:
        try:
            with (
                client.tasks.evaluate(
                    task_name,
                    dataset,
                    configurations=configurations,
                    examples=example_split,
                    holdout_examples=holdout,
                    labels=_split_list(labels, "--labels") if labels else (),
                    multi_label=multi_label,
                    target_words=words,
                    target_sentences=sentences,
                    format="bullets" if bullets else None,
                    allow_unanswerable=unanswerable,
                    limit=limit,
                    concurrency=concurrency,
                    return_predictions=predictions is not None,
                ) as evaluation,
                _EvalProgressDisplay(len(configurations)) as display,
                contextlib.ExitStack() as files,
            ):
                sink = files.enter_context(predictions.open("w", encoding="utf-8")) if predictions else None
                for event in evaluation:
                    if isinstance(event, EvalProgress):
                        display.update(event)
                    elif isinstance(event, EvalPrediction) and sink is not None:
                        sink.write(json.dumps(asdict(event), ensure_ascii=False) + "\n")
                summary = evaluation.wait()
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(summary), ensure_ascii=False))
        return
    for line in _eval_table(task_name, summary):
        typer.echo(line)
    best = summary.best
    value = best.metrics.metric(summary.primary_metric) if summary.primary_metric in _ALL_METRICS else None
    score = f" ({summary.primary_metric} {value:.3f})" if value is not None else ""
    typer.echo(f"best: {best.name}{score}; {summary.total_s:.1f}s in all")


# --- fine-tuning commands ----------------------------------------------------------------------------------------

finetune_app = typer.Typer(
    help="Fine-tune models: jobs (LoRA or full) and hyperparameter sweeps.", no_args_is_help=True
)
sweep_app = typer.Typer(
    help="Hyperparameter sweeps: every trial is a fine-tuning job with the searched values applied.",
    no_args_is_help=True,
)
finetune_app.add_typer(sweep_app, name="sweep")
app.add_typer(finetune_app, name="finetune")

EXIT_JOB_FAILED = 1
"""Exit status of `finetune create --watch` / `finetune watch` when the job failed (also any server error)."""
EXIT_JOB_CANCELLED = 3
"""Exit status when the watched job (or waited sweep) was cancelled."""


class _FineTuneMethodChoice(str, enum.Enum):
    """--method values of finetune."""

    lora = "lora"
    full = "full"


class _DataFormatChoice(str, enum.Enum):
    """--format values."""

    chat = "chat"
    prompt_completion = "prompt_completion"
    task_records = "task_records"


class _JobStateChoice(str, enum.Enum):
    """--state values of finetune list."""

    validating = "validating"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class _SweepStateChoice(str, enum.Enum):
    """--state values of finetune sweep list."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class _SweepMethodChoice(str, enum.Enum):
    """--search values."""

    grid = "grid"
    bayesian = "bayesian"


class _ObjectiveChoice(str, enum.Enum):
    """--objective values."""

    validation_loss = "validation_loss"
    train_loss = "train_loss"


FtDataArg = Annotated[
    str,
    typer.Argument(
        metavar="DATA.jsonl",
        help="Training data, one JSON object per line: read here and sent with the request (--server-path: a path "
        "the server reads).",
    ),
]
FtMethodOpt = Annotated[_FineTuneMethodChoice, typer.Option(help="lora: train an adapter; full: all weights.")]
FtModelOpt = Annotated[str, typer.Option("--model", "-m", help="Base model (default: the server's default model).")]
FtValidationOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--validation", metavar="V.jsonl", help="Validation data (default: hold out --validation-split)."),
]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Passes over the training data (default 3).")]  # noqa: UP045
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Examples per micro-step (default 8).")]  # noqa: UP045
LearningRateOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Peak learning rate (default 2e-4 for LoRA, 2e-5 for full)."),
]
LoraRankOpt = Annotated[Optional[int], typer.Option(help="LoRA rank (default 8).")]  # noqa: UP045
SuffixOpt = Annotated[str, typer.Option(help="Part of the result's name, ft:<base>:<suffix>:<job-id>.")]
FormatOpt = Annotated[
    Optional[_DataFormatChoice],  # noqa: UP045
    typer.Option("--format", help="Line format (default: detected from the first line; task_records with --task)."),
]
FtTaskOpt = Annotated[
    Optional[_TaskChoice],  # noqa: UP045
    typer.Option("--task", help="The data are task records for this task (served with the same prompt)."),
]
LabelOpt = Annotated[
    list[str],
    typer.Option("--label", "-l", help="Classify task records: a label, in order (repeatable; default: the data's)."),
]
MultiLabelOpt = Annotated[bool, typer.Option("--multi-label", help="Classify task records: several labels per text.")]
HpOpt = Annotated[
    list[str],
    typer.Option(
        "--hp",
        metavar="NAME=VALUE",
        help="Any hyperparameter by name, e.g. --hp lr_scheduler=cosine --hp lora_target_modules=q_proj,v_proj "
        "(repeatable).",
    ),
]
ValidationSplitOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Without --validation: fraction of the data held out (default 0.1; 0 = none)."),
]
TruncateOpt = Annotated[
    bool, typer.Option("--truncate", help="Truncate over-long examples instead of failing validation.")
]
MetadataOpt = Annotated[
    list[str], typer.Option("--metadata", metavar="KEY=VALUE", help="A label kept with the job (repeatable).")
]
FtServerPathOpt = Annotated[
    bool, typer.Option("--server-path", help="DATA and --validation are paths on the server (not read here).")
]
IdempotencyKeyOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Repeating the command with the same key returns the first job instead of a new one."),
]
WebhookUrlOpt = Annotated[Optional[str], typer.Option(help="URL POSTed the record when it ends.")]  # noqa: UP045
WebhookSecretOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(envvar="GENLOOM_WEBHOOK_SECRET", help="Sign webhook calls with this secret (HMAC-SHA256)."),
]


def _key_values(items: Sequence[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        pairs.append((key.strip(), value.strip()))
    return pairs


def _hyperparameters(hp: Sequence[str], **named: Any) -> dict[str, Any]:
    """--hp NAME=VALUE pairs, then the named options (--epochs, ...) that were given."""
    values: dict[str, Any] = {}
    try:
        for name, text in _key_values(hp, "--hp"):
            values[name] = parse_hyperparameter(name, text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--hp") from None
    values.update({name: value for name, value in named.items() if value is not None})
    return values


def _job_spec_options(
    data: str,
    *,
    method: _FineTuneMethodChoice,
    model: str,
    validation: str | None,
    hyperparameters: dict[str, Any],
    suffix: str,
    data_format: _DataFormatChoice | None,
    task: _TaskChoice | None,
    labels: Sequence[str],
    multi_label: bool,
    validation_split: float | None,
    truncate: bool,
    metadata: Sequence[str],
    server_path: bool,
) -> FineTuneSpec:
    """The job spec the options describe; usage errors for what the SDK rejects before sending."""
    if (labels or multi_label) and (task is None or task.value != "classify"):
        raise typer.BadParameter("--label and --multi-label are for --task classify")
    for path, option in ((data, "DATA.jsonl"), (validation, "--validation")):
        if path is not None and not server_path and not Path(path).is_file():
            raise typer.BadParameter(f"no file {path} (for a path on the server, add --server-path)", param_hint=option)
    try:
        return FineTuneSpec(
            training_file=data if server_path else Path(data),
            model=model,
            method=method.value,
            validation_file=(validation if server_path else Path(validation)) if validation is not None else None,
            data_format=data_format.value if data_format else None,
            task=task.value if task else None,
            task_options={"labels": list(labels), "multi_label": multi_label} if labels or multi_label else None,
            hyperparameters=hyperparameters or None,
            suffix=suffix,
            validation_split=validation_split,
            truncate_long_examples=truncate,
            metadata=dict(_key_values(metadata, "--metadata")) or None,
            send_path=server_path,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _dump(value: Any) -> str:
    return json.dumps(asdict(value), ensure_ascii=False, default=_json_default)


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [headers, *rows]]


def _progress(metrics: JobMetrics | None) -> str:
    if metrics is None or not metrics.total_steps:
        return "-"
    return f"{metrics.step}/{metrics.total_steps}"


def _job_error_lines(error: JobError | None) -> list[str]:
    if error is None:
        return []
    lines = [f"{error.code}: {error.message}"]
    lines += [f"  {line_error}" for line_error in error.line_errors]
    return lines


class _JobProgressDisplay:
    """A job's step progress bar on standard error (rich's when installed, else a plain line), with training
    loss and ETA; event lines go to standard output above it."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._bar: Any = None
        self._last_line = ""
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[eta]}"),
            console=Console(stderr=True),
        )

    def __enter__(self) -> _JobProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line:
            typer.echo(err=True)

    def update(self, metrics: JobMetrics) -> None:
        loss = f"loss {metrics.train_loss:.4f}" if metrics.train_loss is not None else ""
        eta = f"eta {_duration(metrics.eta_seconds)}" if metrics.eta_seconds is not None else ""
        epoch = f"epoch {metrics.epoch:.2f}"
        if self._progress is None:
            line = f"\rstep {metrics.step}/{metrics.total_steps}  {epoch}  {loss}  {eta}".rstrip()
            if line != self._last_line:
                typer.echo(line, nl=False, err=True)
                self._last_line = line
            return
        if self._bar is None:
            self._bar = self._progress.add_task(epoch, total=metrics.total_steps or None, loss=loss, eta=eta)
        self._progress.update(
            self._bar, description=epoch, completed=metrics.step, total=metrics.total_steps or None, loss=loss, eta=eta
        )

    def line(self, text: str, *, err: bool = False) -> None:
        """An event line, printed above the bar."""
        if self._progress is None and self._last_line:
            typer.echo(err=True)
            self._last_line = ""
        typer.echo(text, err=err)


def _show_event(event: JobEvent, display: _JobProgressDisplay) -> None:
    stamp = f"[{event.created_at.astimezone():%H:%M:%S}] " if event.created_at else ""
    if event.type == "metrics" and event.metrics is not None:
        display.update(event.metrics)
        if event.metrics.validation_loss is not None:
            m = event.metrics
            display.line(f"{stamp}step {m.step}/{m.total_steps}: validation loss {m.validation_loss:.4f}")
    elif event.type == "checkpoint" and event.checkpoint is not None:
        c = event.checkpoint
        losses = f"train loss {_loss(c.train_loss)}" + (
            f", validation loss {_loss(c.validation_loss)}" if c.validation_loss is not None else ""
        )
        display.line(f"{stamp}saved {c.name} (step {c.step}, epoch {c.epoch:.2f}, {losses})")
    elif event.type == "state_change" and event.state is not None:
        if event.state == "succeeded":
            display.line(f"{stamp}succeeded: {event.result_model}")
        elif event.state == "failed":
            display.line(f"{stamp}failed: " + "\n".join(_job_error_lines(event.error) or [event.message]), err=True)
        else:
            display.line(f"{stamp}{event.state}")
    elif event.level == "warning":
        display.line(f"{stamp}warning: {event.message}")
    elif event.level == "error":
        display.line(f"{stamp}error: {event.message}", err=True)
    else:
        display.line(f"{stamp}{event.message}")


def _follow_job(client: Client, job_id: str, *, after: str | None, follow: bool, as_json: bool) -> int:
    """Print a job's events until it ends; the exit status for how it ended."""
    try:
        with contextlib.ExitStack() as stack:
            events = stack.enter_context(client.finetune.watch(job_id, after_event_id=after, follow=follow))
            display = stack.enter_context(_JobProgressDisplay()) if not as_json else None
            for event in events:
                if display is None:
                    typer.echo(_dump(event))
                else:
                    _show_event(event, display)
            final = events.final
    except APIStatusError as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo(f"stopped watching; {job_id} carries on (genloom finetune cancel {job_id} stops it)", err=True)
        return 130
    if final is None or final.state == "succeeded":
        return 0
    return EXIT_JOB_CANCELLED if final.state == "cancelled" else EXIT_JOB_FAILED


_FINETUNE_CREATE_HELP = "\n\n".join(
    [
        "Submit a fine-tuning job, and with --watch follow it to the end.",
        'DATA.jsonl: chat {"messages": [{"role", "content"}, ...]}, prompt/completion {"prompt", "completion"}, '
        'or with --task the task records of `genloom eval` ({"text", "label"}, {"document", "summary"}, '
        '{"question", "context"?, "answer"}).',
        "Hyperparameters: --epochs, --batch-size, --learning-rate, --lora-rank, or any by name with --hp "
        "(e.g. --hp lr_scheduler=cosine --hp precision=bf16 --hp max_steps=200).",
        f"With --watch the exit status is 0 when the job succeeded, {EXIT_JOB_FAILED} when it failed and "
        f"{EXIT_JOB_CANCELLED} when it was cancelled.",
    ]
)


@finetune_app.command("create", help=_FINETUNE_CREATE_HELP)
def finetune_create(
    ctx: typer.Context,
    data: FtDataArg,
    method: FtMethodOpt = _FineTuneMethodChoice.lora,
    model: FtModelOpt = "",
    validation: FtValidationOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    learning_rate: LearningRateOpt = None,
    lora_rank: LoraRankOpt = None,
    suffix: SuffixOpt = "",
    data_format: FormatOpt = None,
    task: FtTaskOpt = None,
    label: LabelOpt = [],  # noqa: B006
    multi_label: MultiLabelOpt = False,
    hp: HpOpt = [],  # noqa: B006
    validation_split: ValidationSplitOpt = None,
    truncate: TruncateOpt = False,
    metadata: MetadataOpt = [],  # noqa: B006
    server_path: FtServerPathOpt = False,
    idempotency_key: IdempotencyKeyOpt = None,
    webhook_url: WebhookUrlOpt = None,
    webhook_secret: WebhookSecretOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job until it ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a fine-tuning job."""
    hyperparameters = _hyperparameters(
        hp, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, lora_rank=lora_rank
    )
    spec = _job_spec_options(
        data,
        method=method,
        model=model,
        validation=validation,
        hyperparameters=hyperparameters,
        suffix=suffix,
        data_format=data_format,
        task=task,
        labels=label,
        multi_label=multi_label,
        validation_split=validation_split,
        truncate=truncate,
        metadata=metadata,
        server_path=server_path,
    )
    arguments = {f.name: getattr(spec, f.name) for f in fields(spec)}
    with ctx.obj.client() as client:
        try:
            job = client.finetune.create(
                **arguments, idempotency_key=idempotency_key, webhook_url=webhook_url, webhook_secret=webhook_secret
            )
        except APIStatusError as err:
            _fail(err)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err)) from None
        if as_json:
            typer.echo(_dump(job))
        else:
            note = "" if job.created is not False else " (an earlier request with this idempotency key created it)"
            typer.echo(f"{job.id} {job.state}{note}")
        if watch:
            raise typer.Exit(_follow_job(client, job.id, after=None, follow=True, as_json=as_json))


@finetune_app.command("watch")
def finetune_watch(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    after: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Start after this event id (default: the job's first event)."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep following until the job ends, or print what happened.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print each event as a JSON line.")] = False,
) -> None:
    """Follow a job's events with a progress bar (step, loss, ETA) until it ends. Exit status: 0 succeeded (or
    still going with --no-follow), 1 failed, 3 cancelled."""
    with ctx.obj.client() as client:
        raise typer.Exit(_follow_job(client, job_id, after=after, follow=follow, as_json=as_json))


def _hyperparameter_text(hp: Hyperparameters) -> str:
    parts = []
    for name, value in hp.as_dict().items():
        if isinstance(value, tuple):
            value = ",".join(value)
        if value in ("", (), 0) and name not in ("weight_decay",):
            continue
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _job_lines(job: FineTuneJob) -> list[str]:
    m = job.latest_metrics
    state = job.state + (" (cancel requested)" if job.cancel_requested else "")
    if m is not None and job.state == "running":
        state += (
            f"  step {_progress(m)}, epoch {m.epoch:.2f}, loss {_loss(m.train_loss)}, eta {_duration(m.eta_seconds)}"
        )
    rows = [
        ("id", job.id),
        ("state", state),
        ("base model", job.base_model or "-"),
        ("method", job.method),
        ("result model", job.result_model or "-"),
        ("training data", str(job.spec.training_file) if isinstance(job.spec.training_file, str) else "(inline)"),
        ("examples", f"{job.training_examples} training, {job.validation_examples} validation"),
        ("best val loss", _loss(job.best_validation_loss)),
        ("hyperparameters", _hyperparameter_text(job.hyperparameters) or "-"),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.sweep_id:
        rows.append(("sweep", f"{job.sweep_id} trial {job.trial_index}"))
    if job.attempts > 1:
        rows.append(("attempts", f"{job.attempts} (resumed from step {job.resumed_from_step})"))
    lines = [f"{name:<16}{value}" for name, value in rows]
    errors = _job_error_lines(job.error)
    if errors:
        lines.append(f"{'error':<16}{errors[0]}")
        lines += [" " * 16 + line for line in errors[1:]]
    return lines


@finetune_app.command("get")
def finetune_get(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a job: state, progress, result model, hyperparameters, error."""
    with ctx.obj.client() as client:
        try:
            job = client.finetune.get(job_id)
        except APIStatusError as err:
            _fail(err)
    typer.echo(_dump(job) if as_json else "\n".join(_job_lines(job)))


@finetune_app.command("list")
def finetune_list(
    ctx: typer.Context,
    state: Annotated[list[_JobStateChoice], typer.Option(help="Only jobs in this state (repeatable).")] = [],  # noqa: B006
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only jobs on this base model.")] = None,  # noqa: UP045
    sweep: Annotated[Optional[str], typer.Option(help="Only the trials of this sweep.")] = None,  # noqa: UP045
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many jobs.")] = 20,
    show_all: Annotated[bool, typer.Option("--all", help="Show every job (all pages).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print each job as a JSON line.")] = False,
) -> None:
    """List fine-tuning jobs, newest first."""
    with ctx.obj.client() as client:
        try:
            pages = client.finetune.list(
                state=[s.value for s in state] or None,
                base_model=model,
                sweep_id=sweep,
                limit=min(limit, 100),
            )
            jobs = list(pages) if show_all else list(itertools.islice(pages, limit))
        except APIStatusError as err:
            _fail(err)
    if as_json:
        for job in jobs:
            typer.echo(_dump(job))
        return
    rows = [
        [j.id, j.state, j.base_model, j.method, _progress(j.latest_metrics), _when(j.created_at), j.result_model or "-"]
        for j in jobs
    ]
    for line in _table(["ID", "STATE", "MODEL", "METHOD", "STEPS", "CREATED", "RESULT"], rows):
        typer.echo(line)


@finetune_app.command("cancel")
def finetune_cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job (a running one stops at its next training step)."""
    with ctx.obj.client() as client:
        try:
            job = client.finetune.cancel(job_id)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(_dump(job))
    elif job.state == "cancelled":
        typer.echo(f"{job.id} cancelled")
    else:
        typer.echo(f"{job.id} cancel requested: it stops at its next training step")


@finetune_app.command("checkpoints")
def finetune_checkpoints(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """List a job's kept checkpoints, by step."""
    with ctx.obj.client() as client:
        try:
            checkpoints = client.finetune.checkpoints(job_id)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checkpoints], default=_json_default))
        return
    rows = [
        [
            c.name,
            str(c.step),
            f"{c.epoch:.2f}",
            _loss(c.train_loss),
            _loss(c.validation_loss),
            f"{c.size_bytes / 2**20:.1f} MiB",
            _when(c.created_at),
            c.path,
        ]
        for c in checkpoints
    ]
    for line in _table(["NAME", "STEP", "EPOCH", "TRAIN LOSS", "VAL LOSS", "SIZE", "CREATED", "PATH"], rows):
        typer.echo(line)


# --- sweeps --------------------------------------------------------------------------------------------------------


def _number(text: str, option: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"expected a number, got {text!r}", param_hint=option) from None


def _search_dimension(name: str, text: str) -> Any:
    """One --space value: LOW..HIGH[:log][:step=N][:points=N] is a range (integers when both ends are), anything
    else comma-separated choices (a list-valued hyperparameter's items joined with '+')."""
    option = "--space"
    if ".." in text:
        bounds, *flags = text.split(":")
        low_text, _, high_text = bounds.partition("..")
        low, high = _number(low_text.strip(), option), _number(high_text.strip(), option)
        settings: dict[str, Any] = {}
        for flag in flags:
            key, _, value = flag.strip().partition("=")
            if key == "log" and not value:
                settings["log"] = True
            elif key in ("step", "points") and value.isdigit():
                settings["step" if key == "step" else "grid_points"] = int(value)
            else:
                raise typer.BadParameter(f"unknown range flag {flag!r} (log, step=N, points=N)", param_hint=option)
        integers = isinstance(low, int) and isinstance(high, int) and "grid_points" not in settings
        if not integers and "step" in settings:
            raise typer.BadParameter("step=N is for integer ranges; use points=N", param_hint=option)
        try:
            if integers:
                return IntRange(int(low), int(high), **settings)
            return FloatRange(float(low), float(high), **settings)
        except ValueError as err:
            raise typer.BadParameter(f"{name}: {err}", param_hint=option) from None
    choices = [choice.strip() for choice in text.split(",") if choice.strip()]
    if not choices:
        raise typer.BadParameter(f"{name}: no values", param_hint=option)
    try:
        return [parse_hyperparameter(name, choice.replace("+", ",")) for choice in choices]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=option) from None


def _value_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _space_text(space: Any) -> str:
    if isinstance(space, FloatRange):
        return f"{space.min:g}..{space.max:g}" + (":log" if space.log else "")
    if isinstance(space, IntRange):
        return f"{space.min}..{space.max}" + (f":step={space.step}" if space.step != 1 else "")
    return ",".join(_value_text(v) for v in space)


def _sweep_lines(sweep: Sweep) -> list[str]:
    spec = sweep.spec
    done = sum(1 for t in sweep.trials if t.state in ("succeeded", "failed", "cancelled"))
    lines = [
        f"{'id':<12}{sweep.id}",
        f"{'state':<12}{sweep.state}" + (" (cancel requested)" if sweep.cancel_requested else ""),
        f"{'search':<12}{spec.method}, minimizing {spec.objective}, {spec.parallelism} at a time",
        f"{'space':<12}" + "; ".join(f"{name}={_space_text(s)}" for name, s in spec.search_space.items()),
        f"{'trials':<12}{len(sweep.trials)} created, {done} ended"
        + (f" of {spec.max_trials}" if spec.max_trials else ""),
    ]
    if sweep.best_trial is not None:
        best = sweep.best_trial
        lines.append(f"{'best':<12}trial {best.index} ({best.job_id}): {best.result_model or '-'}")
    errors = _job_error_lines(sweep.error)
    if errors:
        lines.append(f"{'error':<12}{errors[0]}")
    names = list(spec.search_space)
    best_index = sweep.best_trial.index if sweep.best_trial is not None else None
    rows = [
        [
            "*" if t.index == best_index else "",
            str(t.index),
            t.job_id,
            t.state,
            *(_value_text(t.parameters.get(n, "-")) for n in names),
            _loss(t.objective_value),
            _loss(t.validation_loss),
        ]
        for t in sweep.trials
    ]
    if rows:
        lines.append("")
        lines += _table(["", "#", "JOB", "STATE", *names, "OBJECTIVE", "VAL LOSS"], rows)
    return lines


_SWEEP_CREATE_HELP = "\n\n".join(
    [
        "Start a hyperparameter sweep over the job DATA.jsonl and the job options describe.",
        "--space NAME=VALUES (repeatable) searches a hyperparameter: comma-separated choices "
        "(--space lr_scheduler=linear,cosine; a list-valued one joins items with '+': "
        "--space lora_target_modules=q_proj+v_proj,all-linear), or a range LOW..HIGH[:log][:step=N][:points=N] "
        "(--space learning_rate=1e-5..1e-3:log, --space lora_rank=4..16:step=4).",
        f"With --wait the exit status is 0 when the sweep succeeded, {EXIT_JOB_FAILED} when it failed and "
        f"{EXIT_JOB_CANCELLED} when it was cancelled.",
    ]
)


@sweep_app.command("create", help=_SWEEP_CREATE_HELP)
def sweep_create(
    ctx: typer.Context,
    data: FtDataArg,
    space: Annotated[list[str], typer.Option("--space", metavar="NAME=VALUES", help="A searched hyperparameter.")],
    search: Annotated[_SweepMethodChoice, typer.Option(help="grid: every combination; bayesian: TPE.")] = (
        _SweepMethodChoice.grid
    ),
    max_trials: Annotated[int, typer.Option(min=0, help="Trials to run (0: the whole grid, or 10).")] = 0,
    parallelism: Annotated[int, typer.Option(min=0, help="Trials running at once (0: 2).")] = 0,
    objective: Annotated[
        Optional[_ObjectiveChoice],  # noqa: UP045
        typer.Option(help="What to minimize (default validation_loss)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the Bayesian sampler.")] = 0,
    method: FtMethodOpt = _FineTuneMethodChoice.lora,
    model: FtModelOpt = "",
    validation: FtValidationOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    learning_rate: LearningRateOpt = None,
    lora_rank: LoraRankOpt = None,
    suffix: SuffixOpt = "",
    data_format: FormatOpt = None,
    task: FtTaskOpt = None,
    label: LabelOpt = [],  # noqa: B006
    multi_label: MultiLabelOpt = False,
    hp: HpOpt = [],  # noqa: B006
    validation_split: ValidationSplitOpt = None,
    truncate: TruncateOpt = False,
    metadata: MetadataOpt = [],  # noqa: B006
    server_path: FtServerPathOpt = False,
    idempotency_key: IdempotencyKeyOpt = None,
    webhook_url: WebhookUrlOpt = None,
    webhook_secret: WebhookSecretOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Poll the sweep until it ends, then show its trials.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a hyperparameter sweep."""
    search_space = {name: _search_dimension(name, text) for name, text in _key_values(space, "--space")}
    hyperparameters = _hyperparameters(
        hp, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, lora_rank=lora_rank
    )
    spec = _job_spec_options(
        data,
        method=method,
        model=model,
        validation=validation,
        hyperparameters=hyperparameters,
        suffix=suffix,
        data_format=data_format,
        task=task,
        labels=label,
        multi_label=multi_label,
        validation_split=validation_split,
        truncate=truncate,
        metadata=metadata,
        server_path=server_path,
    )
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.create(
                spec,
                search_space=search_space,
                method=search.value,
                max_trials=max_trials,
                parallelism=parallelism,
                objective=objective.value if objective else None,
                seed=seed,
                idempotency_key=idempotency_key,
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
            )
            typer.echo(_dump(sweep) if as_json else f"{sweep.id} {sweep.state}")
            if not wait:
                return
            sweep = client.finetune.sweeps.wait(sweep.id, on_update=_SweepStatusLine())
        except APIStatusError as err:
            _fail(err)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err)) from None
    typer.echo(_dump(sweep) if as_json else "\n".join(_sweep_lines(sweep)))
    if sweep.state != "succeeded":
        raise typer.Exit(EXIT_JOB_CANCELLED if sweep.state == "cancelled" else EXIT_JOB_FAILED)


class _SweepStatusLine:
    """`sweeps.wait()`'s on_update for --wait: one line on standard error whenever the trial counts change."""

    def __init__(self) -> None:
        self._last = ""

    def __call__(self, sweep: Sweep) -> None:
        counts: dict[str, int] = {}
        for trial in sweep.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        line = f"{sweep.state}: " + ", ".join(f"{n} {state}" for state, n in counts.items())
        if line != self._last:
            typer.echo(line, err=True)
            self._last = line


@sweep_app.command("get")
def sweep_get(
    ctx: typer.Context,
    sweep_id: Annotated[str, typer.Argument(metavar="SWEEP", help="The sweep's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a sweep and its trials, the best marked with '*'."""
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.get(sweep_id)
        except APIStatusError as err:
            _fail(err)
    typer.echo(_dump(sweep) if as_json else "\n".join(_sweep_lines(sweep)))


@sweep_app.command("list")
def sweep_list(
    ctx: typer.Context,
    state: Annotated[list[_SweepStateChoice], typer.Option(help="Only sweeps in this state (repeatable).")] = [],  # noqa: B006
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many sweeps.")] = 20,
    show_all: Annotated[bool, typer.Option("--all", help="Show every sweep (all pages).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print each sweep as a JSON line.")] = False,
) -> None:
    """List sweeps, newest first."""
    with ctx.obj.client() as client:
        try:
            pages = client.finetune.sweeps.list(state=[s.value for s in state] or None, limit=min(limit, 100))
            sweeps = list(pages) if show_all else list(itertools.islice(pages, limit))
        except APIStatusError as err:
            _fail(err)
    if as_json:
        for sweep in sweeps:
            typer.echo(_dump(sweep))
        return
    rows = [
        [
            s.id,
            s.state,
            s.spec.method,
            str(len(s.trials)),
            _loss(s.best_trial.objective_value) if s.best_trial else "-",
            _when(s.created_at),
        ]
        for s in sweeps
    ]
    for line in _table(["ID", "STATE", "SEARCH", "TRIALS", "BEST", "CREATED"], rows):
        typer.echo(line)


@sweep_app.command("cancel")
def sweep_cancel(
    ctx: typer.Context,
    sweep_id: Annotated[str, typer.Argument(metavar="SWEEP", help="The sweep's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a sweep: no further trials start, and running ones are cancelled."""
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.cancel(sweep_id)
        except APIStatusError as err:
            _fail(err)
    if as_json:
        typer.echo(_dump(sweep))
    elif sweep.state == "cancelled":
        typer.echo(f"{sweep.id} cancelled")
    else:
        typer.echo(f"{sweep.id} cancel requested: its running trials are stopping")


def _choices(name: str, values: Any) -> Any:
    """A str Enum for a fixed set of choices (typer validates and lists them in --help)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _serve_command() -> Any:
    """`genloom serve SERVICE`, its flags generated from the settings dataclasses (one source for env vars,
    defaults and help). The server code is imported only when the command runs."""
    from genloom.services.launch import SERVICES, SETTINGS_CLASSES

    params = [
        inspect.Parameter(
            "service",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=_choices("Service", ["all", *SERVICES]),
            default=typer.Argument(..., help="Which service(s) this process hosts."),
        )
    ]
    owners: dict[str, type] = {}
    for cls in SETTINGS_CLASSES:
        for info in cls.fields():
            owners[info.name] = cls
            annotation: Any = info.type if info.default is not None else Optional[info.type]  # noqa: UP045
            if info.choices:
                annotation = _choices(info.name, info.choices)
            params.append(
                inspect.Parameter(
                    info.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=annotation,
                    default=typer.Option(
                        info.default, info.flag, envvar=info.env, help=info.help, rich_help_panel=cls.__name__
                    ),
                )
            )

    def serve(service: str, **values: Any) -> None:
        """Run genloom server(s) until SIGTERM/SIGINT. Every flag also reads its GENLOOM_* variable."""
        from genloom.services.launch import run
        from genloom.services.server.settings import SettingsError

        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        try:
            built = {cls: cls(**{k: v for k, v in values.items() if owners[k] is cls}) for cls in SETTINGS_CLASSES}
        except SettingsError as err:
            raise typer.BadParameter(str(err)) from None
        try:
            run(getattr(service, "value", service), *built.values())
        except SettingsError as err:
            raise typer.BadParameter(str(err)) from None

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return serve


with contextlib.suppress(ImportError):  # the SDK alone (no server extra): `genloom serve` is not offered
    app.command("serve", help="Run genloom server(s) until SIGTERM/SIGINT.")(_serve_command())


@app.command(
    "worker",
    help="Run a fine-tuning worker: a Celery worker on the training queue (Redis at GENLOOM_REDIS_URL) that trains "
    "jobs one at a time until SIGTERM. Configured by the GENLOOM_* variables of `genloom serve` (models, "
    "GENLOOM_FINETUNE_*); run one per GPU (CUDA_VISIBLE_DEVICES) and as many as you like on one queue.",
)
def worker_command(
    hostname: Optional[str] = typer.Option(None, help="Worker name shown on jobs (default genloom-<pid>@<host>)."),  # noqa: UP045
    loglevel: str = typer.Option("info", envvar="GENLOOM_LOG_LEVEL", help="Log level."),
) -> None:
    try:
        from genloom.services.finetune.worker import main as worker_main
    except ImportError as err:  # the SDK alone
        raise typer.BadParameter(f"the worker needs the server extra (pip install 'genloom[server]'): {err}") from None
    worker_main([*(["--hostname", hostname] if hostname else []), "--loglevel", loglevel])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
