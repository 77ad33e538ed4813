"""The `genloom` command: run servers (`genloom serve`) and call them (`genloom tokenize`, ...)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from genloom._client import Client
from genloom._exceptions import APIStatusError

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
        run(getattr(service, "value", service), *built.values())

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return serve


with contextlib.suppress(ImportError):  # the SDK alone (no server extra): `genloom serve` is not offered
    app.command("serve", help="Run genloom server(s) until SIGTERM/SIGINT.")(_serve_command())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
