"""`genloom eval`: compare prompting strategies, models and methods on a labeled dataset.

Builds the configurations from the options, streams the evaluation with a progress bar per configuration and
prints the metrics table with the best configuration marked. Attached to the root app by the package's __init__.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from genloom._exceptions import APIStatusError
from genloom.cli.display import EvalProgressDisplay
from genloom.cli.options import AdapterOpt, JsonOpt, TaskChoice, read_records, split_list
from genloom.cli.root import fail
from genloom.types.tasks import EvalConfiguration, EvalPrediction, EvalProgress, EvalSummary

app = typer.Typer()

_EVAL_METRICS = {
    "classify": ("accuracy", "macro_f1"),
    "summarize": ("rouge1", "rouge2", "rouge_l"),
    "answer": ("exact_match", "token_f1"),
}
_ALL_METRICS = {name for names in _EVAL_METRICS.values() for name in names}


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(item) for item in split_list(value, option)]
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
    task: Annotated[TaskChoice, typer.Option("--task", "-t", help="The task the dataset is for.")],
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
        methods = list(split_list(method, "--method"))
        for m in methods:
            if m not in ("score", "generate"):
                raise typer.BadParameter(f"unknown method {m!r} (score or generate)", param_hint="--method")
    if words is not None and sentences is not None:
        raise typer.BadParameter("give --words or --sentences, not both")
    configurations = _eval_configurations(_int_list(shots, "--shots"), model or [""], methods, adapter, calibrate)
    dataset: Any = data if server_path else read_records(data, task_name, "DATA.jsonl")
    example_split: Any = None
    if examples is not None:
        example_split = examples if server_path else read_records(examples, task_name, "--examples")
    with ctx.obj.client() as client:
        try:
            with (
                client.tasks.evaluate(
                    task_name,
                    dataset,
                    configurations=configurations,
                    examples=example_split,
                    holdout_examples=holdout,
                    labels=split_list(labels, "--labels") if labels else (),
                    multi_label=multi_label,
                    target_words=words,
                    target_sentences=sentences,
                    format="bullets" if bullets else None,
                    allow_unanswerable=unanswerable,
                    limit=limit,
                    concurrency=concurrency,
                    return_predictions=predictions is not None,
                ) as evaluation,
                EvalProgressDisplay(len(configurations)) as display,
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
            fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(summary), ensure_ascii=False))
        return
    for line in _eval_table(task_name, summary):
        typer.echo(line)
    best = summary.best
    value = best.metrics.metric(summary.primary_metric) if summary.primary_metric in _ALL_METRICS else None
    score = f" ({summary.primary_metric} {value:.3f})" if value is not None else ""
    typer.echo(f"best: {best.name}{score}; {summary.total_s:.1f}s in all")
