"""Token-bounded, overlapping chunks of a long text, cut on sentence boundaries where there are any.

Works on the tokenizer's offsets (code-point spans per token), so chunk sizes are in the model's own tokens and
chunks are exact substrings of the input (AnswerResult.support reports their spans).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

# A sentence ends after ., ! or ? (plus closing quotes/brackets) followed by whitespace, or at a line break.
_SENTENCE_END = re.compile("[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\\]]*(?=\\s)|\n")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # code points, half-open
    end: int
    tokens: int

    def text(self, source: str) -> str:
        return source[self.start : self.end]


def sentence_starts(text: str) -> list[int]:
    """Code-point positions where a sentence starts (after the boundary's whitespace), 0 first."""
    starts = [0]
    for match in _SENTENCE_END.finditer(text):
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if 0 < pos < len(text) and pos != starts[-1]:
            starts.append(pos)
    return starts


def split_chunks(text: str, offsets: Sequence[tuple[int, int]], chunk_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Split `text` (whose tokens span `offsets`) into chunks of at most `chunk_tokens` tokens. A chunk ends at
    the last sentence start that keeps it within the limit (mid-sentence only when one sentence is longer than a
    chunk); the next chunk starts `overlap_tokens` before that end, moved forward to a sentence start when one
    lies in the overlap."""
    if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("need chunk_tokens >= 1 and 0 <= overlap_tokens < chunk_tokens")
    n = len(offsets)
    if n == 0:
        return []
    token_starts = [start for start, _ in offsets]
    # Token index at which each sentence begins (the first token starting at or after it).
    boundaries = sorted({bisect.bisect_left(token_starts, pos) for pos in sentence_starts(text)} - {0, n})
    chunks: list[Chunk] = []
    first = 0
    while True:
        limit = first + chunk_tokens
        if limit >= n:
            last = n
        else:
            # The latest sentence boundary inside (first, limit]; none -> cut at the token limit.
            i = bisect.bisect_right(boundaries, limit) - 1
            last = boundaries[i] if i >= 0 and boundaries[i] > first else limit
        start_char = 0 if first == 0 else offsets[first][0]
        end_char = len(text) if last == n else offsets[last][0]
        chunks.append(Chunk(len(chunks), start_char, end_char, last - first))
        if last == n:
            return chunks
        first = _next_start(boundaries, first, last, overlap_tokens, chunk_tokens)


def _next_start(boundaries: Sequence[int], first: int, last: int, overlap: int, size: int) -> int:
    """Where the chunk after [first, last) starts: the first sentence start inside the last `overlap` tokens;
    else the sentence start just before them, if that overlaps by at most half a chunk; else `overlap` tokens
    back, mid-sentence."""
    lo = max(last - overlap, first + 1)
    j = bisect.bisect_left(boundaries, lo)
    if j < len(boundaries) and boundaries[j] < last:
        return boundaries[j]
    if j > 0 and boundaries[j - 1] > first and last - boundaries[j - 1] <= size // 2:
        return boundaries[j - 1]
    return lo
