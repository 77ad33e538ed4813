"""Generated token ids -> text, incrementally: correct across multi-byte characters, with stop sequences.

Every engine's output goes through `TextAssembler`, so streaming and unary text are identical by construction
and behave the same on every engine.

Decoding uses two offsets (the approach TGI and vLLM take): the text of ids[prefix:read] is compared with the
text of ids[prefix:], so tokenizers that drop a leading space at the start of a decode (SentencePiece) still
yield exact deltas, and a delta that ends in U+FFFD (an incomplete UTF-8 character split across tokens) is held
until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        min_new_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._skip = skip_special_tokens
        self._min_new_tokens = min_new_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # ids before this were decoded into earlier deltas
        self._read = 0  # ids before this are reflected in self._decoded
        self._decoded = ""  # text decided so far (complete characters only)
        self._released = 0  # characters of _decoded handed out
        self.stop_sequence: str | None = None  # the stop sequence that matched, once one did

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text that can be released now ("" while it is held back). Once a stop
        sequence matched (`stop_sequence` set), returns the text before it and nothing after."""
        if self.stop_sequence is not None:
            return ""
        self.token_ids.extend(token_ids)
        self._decode()
        return self._release(final=False)

    def finish(self) -> str:
        """The end of generation: release whatever was held back (an unfinished character decodes to U+FFFD)."""
        if self.stop_sequence is not None:
            return ""
        if self._read < len(self.token_ids):
            prefix_text = self._text(self._prefix, self._read)
            self._decoded += self._text(self._prefix, len(self.token_ids))[len(prefix_text) :]
            self._read = len(self.token_ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._decoded[: self._released]

    def _text(self, start: int, end: int) -> str:
        return str(self._tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self._skip))

    def _decode(self) -> None:
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix, len(self.token_ids))
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._decoded += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def _release(self, *, final: bool) -> str:
        start = self._released
        if self._stop and len(self.token_ids) >= self._min_new_tokens:
            # Released text never holds the start of a match (a possible prefix is always held back), so
            # searching from the first unreleased character finds every match.
            hit = self._find_stop(start)
            if hit is not None:
                position, sequence = hit
                self.stop_sequence = sequence
                self._released = position
                return self._decoded[start:position]
        end = len(self._decoded)
        if not final and self._stop:
            end -= self._held_suffix()
        self._released = max(end, start)
        return self._decoded[start : self._released]

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for sequence in self._stop:
            position = self._decoded.find(sequence, start)
            if position != -1 and (best is None or position < best[0]):
                best = (position, sequence)
        return best

    def _held_suffix(self) -> int:
        """Length of the longest end of the decoded text that could still grow into a stop sequence."""
        text = self._decoded
        longest = 0
        for sequence in self._stop:
            for size in range(min(len(sequence) - 1, len(text)), longest, -1):
                if sequence.startswith(text[len(text) - size :]):
                    longest = size
                    break
        return longest
