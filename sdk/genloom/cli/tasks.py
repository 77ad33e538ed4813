"""The task service's commands: `genloom summarize`, `answer` and `classify`.

Each reads its inputs (texts, documents, example records), calls the task endpoint and prints the result with a
"[...]" report line on standard error. Attached to the root app by the package's __init__; `genloom eval` lives in
evaluate.py.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from genloom._exceptions import APIStatusError
from genloom.cli.options import (
    AdapterOpt,
    FilesOpt,
    InstructionOpt,
    JsonOpt,
    MaxExamplesOpt,
    MaxNewTokensOpt,
    ModelOpt,
    SeedOpt,
    StrategyOpt,
    TemperatureOpt,
    TextsArg,
    inputs,
    read_records,
    read_text,
    split_list,
)
from genloom.cli.root import fail
from genloom.types.inference import Usage
from genloom.types.tasks import ContextReport, SummarizeFinish, SummarizeProgress, SummaryDelta

app = typer.Typer()


class _MethodChoice(str, enum.Enum):
    """--method values of classify."""

    score = "score"
    generate = "generate"


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
    documents = [read_text(f) for f in files]
    options: dict[str, Any] = dict(
        model=model,
        adapter=adapter,
        strategy=strategy.value if strategy else None,
        examples=read_records(examples, "summarize", "--examples") if examples else (),
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
            fail(err)
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
    passage = read_text(context) if context is not None else None
    with ctx.obj.client() as client:
        try:
            result = client.tasks.answer(
                questions,
                context=passage,
                allow_unanswerable=unanswerable,
                strategy=strategy.value if strategy else None,
                examples=read_records(examples, "answer", "--examples") if examples else (),
                max_examples=max_examples,
                instruction=instruction,
                model=model,
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
        except APIStatusError as err:
            fail(err)
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
    names = split_list(labels, "--labels")
    items = inputs(texts or [], file, chat=False)
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
                examples=read_records(examples, "classify", "--examples") if examples else (),
                max_examples=max_examples,
                instruction=instruction,
                model=model,
                adapter=adapter,
            )
        except APIStatusError as err:
            fail(err)
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
