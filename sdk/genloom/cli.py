"""The `genloom` command: run servers (`genloom serve`) and call them (`genloom tokenize`, `genloom classify`, ...)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from genloom._client import Client
from genloom._exceptions import APIStatusError
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
