"""`make demo`: start genloom on the default model, use it through the SDK, print the results, shut down.

Starts `genloom serve all` (every service on one port) as a child process on a free port, waits until it is
healthy, calls it with `genloom.Client`, then stops it with SIGTERM and checks that it exited cleanly.
"""

from __future__ import annotations

import sys

import genloom
from genloom.services.server.process import ServerProcess

SENTENCE = "genloom turns a language model into dependable task endpoints. Héllo, 世界!"
CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What does a tokenizer do?"},
]


def main() -> int:
    print("starting `genloom serve all` on the default model (the model is converted on the first run, and the")
    print("inference engine loads and warms up: allow a minute)...")
    server = ServerProcess("all", ["--metrics-port", "-1"])
    with server:
        print(f"serving on {server.target}\n")
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
        print("\nstopping the server (SIGTERM)...")
    code = server.stop()
    print(f"server exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
