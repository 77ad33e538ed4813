"""The tokenizer service's commands: `genloom tokenize`, `count-tokens` and `tokenizer-info`.

Attached to the root app by the package's __init__.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from genloom._exceptions import APIStatusError
from genloom.cli.options import ChatOpt, FilesOpt, JsonOpt, ModelOpt, TextsArg, inputs
from genloom.cli.root import fail

app = typer.Typer()


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
                inputs(texts or [], file, chat), model=model, return_tokens=tokens, return_offsets=offsets
            )
        except APIStatusError as err:
            fail(err)
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
            result = client.tokenizer.count_tokens(inputs(texts or [], file, chat), model=model, reserve_tokens=reserve)
        except APIStatusError as err:
            fail(err)
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
            fail(err)
    if as_json:
        typer.echo(json.dumps(asdict(info), ensure_ascii=False))
        return
    typer.echo(f"model           {info.model}")
    typer.echo(f"vocab size      {info.vocab_size}")
    typer.echo(f"context window  {info.context_window}")
    typer.echo(f"chat template   {'yes' if info.has_chat_template else 'no'}")
    typer.echo("special tokens  " + ", ".join(f"{s.kind}={s.token!r}({s.id})" for s in info.special_tokens))
