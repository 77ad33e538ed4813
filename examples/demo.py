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
    print("starting `genloom serve all` on the default model (the first run converts it; that takes ~30 s)...")
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
        print("\nstopping the server (SIGTERM)...")
    code = server.stop()
    print(f"server exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
