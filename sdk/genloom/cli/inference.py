"""The inference service's commands: `genloom generate` and `genloom models`.

Attached to the root app by the package's __init__.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer

from genloom._exceptions import APIStatusError
from genloom.cli.options import JsonOpt, ModelOpt
from genloom.cli.root import fail

app = typer.Typer()


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
            fail(err)
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
            fail(err)
    if as_json:
        typer.echo(json.dumps([asdict(m) for m in listed]))
        return
    for m in listed:
        typer.echo(
            f"{m.name}{' (default)' if m.is_default else ''}  {m.kind}  engine={m.engine}  "
            f"context={m.context_window}  {'ready' if m.ready else 'NOT READY'}"
        )
