"""Score in the hf engine (HFScoring, a part of HFEngine: it runs on the step thread, as a command).

Score: each prompt is prefilled once and its last logits give every continuation's first token; only the later
tokens of longer continuations run again, over a copy of the prompt's cache rows. The prompts of one call that
share a prefix (a task's instruction and examples) prefill it once, its KV shared by all rows. Measured with
benchmarks/classify.py (2-core CPU, one torch thread, ~88-token prompts, 3 one-token labels): one Score call per
text went from 1.6 to 3.9 texts/s (before, each candidate ran prompt+label in full); 32 texts in one Score call
(what the task service sends for a Classify batch) run at 12-15 texts/s. Calls are not merged with each other:
batched numerics differ in the 5th decimal of a log-probability, and the same call should give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from genloom.services.inference.engine import AdapterError, ScoreQuery
from genloom.services.inference.engines.hf_batch import HFRequest, cache_layers, common_prefix, kv

# Score batches: padded tokens per forward, and logit rows (x vocab x 4 bytes: 512 rows ~ 100 MB for a 49k vocab).
_SCORE_TOKEN_BUDGET = 8192
_SCORE_LOGIT_ROWS = 512
# A common prompt prefix is prefilled once when that saves at least this many tokens.
_SCORE_MIN_SHARED_TOKENS = 64


class HFScoring:
    """Scoring over the engine's model; HFEngine provides the model, the adapters and `_forward`."""

    _model: Any
    _adapters: dict[str, str]
    _device: torch.device
    _pad_id: int

    def _forward(self, rows: Sequence[HFRequest | str | None], **inputs: Any) -> Any:
        raise NotImplementedError  # HFEngine's

    def _score(self, queries: Sequence[ScoreQuery]) -> list[list[list[float]]]:
        """Each prompt is prefilled once; the logits at its last position give every continuation's first token,
        and only continuations of two or more tokens run their remaining tokens on top of the prompt's KV cache."""
        for adapter in {q.adapter for q in queries}:
            if adapter is not None and adapter not in self._adapters:
                raise AdapterError(f"unknown adapter {adapter!r}")
        results: list[list[list[float]]] = [[[] for _ in q.continuations] for q in queries]
        # Similar lengths together: less padding per forward.
        order = sorted(range(len(queries)), key=lambda qi: len(queries[qi].prompt_token_ids))
        chunk: list[int] = []
        for qi in [*order, None]:
            if qi is not None:
                grown = [*chunk, qi]
                width = len(queries[qi].prompt_token_ids)  # the longest so far: sorted by length
                if not chunk or (width * len(grown) <= _SCORE_TOKEN_BUDGET and len(grown) <= _SCORE_LOGIT_ROWS):
                    chunk = grown
                    continue
            self._score_prompts([queries[i] for i in chunk], [results[i] for i in chunk])
            chunk = [qi] if qi is not None else []
        return results

    def _score_prompts(self, queries: list[ScoreQuery], results: list[list[list[float]]]) -> None:
        prompts = [list(q.prompt_token_ids) for q in queries]
        adapters = [q.adapter for q in queries]
        lengths = torch.tensor([len(p) for p in prompts])
        cache = DynamicCache(config=self._model.config)
        # Prompts of one task batch share their instruction and examples: that prefix is prefilled once and its KV
        # shared by every row (a view, no copy); each row keeps at least its last token of its own.
        shared = common_prefix(prompts) if len(prompts) > 1 and len(set(adapters)) == 1 else 0
        if (len(prompts) - 1) * shared < _SCORE_MIN_SHARED_TOKENS:
            shared = 0
        if shared:
            self._forward(
                adapters[:1],
                input_ids=torch.tensor([prompts[0][:shared]], device=self._device),
                position_ids=torch.arange(shared, device=self._device)[None, :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            for layer in cache_layers(cache):
                keys, values = kv(layer)
                layer.keys = keys.expand(len(prompts), -1, -1, -1)
                layer.values = values.expand(len(prompts), -1, -1, -1)
        suffixes = [p[shared:] for p in prompts]
        width = max(len(p) for p in suffixes)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.tensor(suffix)
        suffix_mask = (torch.arange(width) >= (width - (lengths - shared))[:, None]).long()
        mask = torch.cat([torch.ones((len(prompts), shared), dtype=torch.long), suffix_mask], dim=1)
        positions = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        # Left padding lines the prompts up at the end: the last position's logits predict every first token.
        out = self._forward(
            adapters,
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        del out
        pairs = [(row, c[0]) for row, q in enumerate(queries) for c in q.continuations]
        picked = first[[r for r, _ in pairs], [t for _, t in pairs]].tolist()
        del first
        longer: list[tuple[int, list[int], list[float]]] = []  # (prompt row, continuation, its result list)
        k = 0
        for row, (q, out_row) in enumerate(zip(queries, results, strict=True)):
            for ci, c in enumerate(q.continuations):
                out_row[ci] = [picked[k]]
                k += 1
                if len(c) > 1:
                    longer.append((row, list(c), out_row[ci]))
        if not longer:
            return
        # The rest of each longer continuation, grouped by length, over a copy of its prompt's cache rows.
        longer.sort(key=lambda item: len(item[1]))
        group: list[tuple[int, list[int], list[float]]] = []
        for item in [*longer, None]:
            if item is not None:
                grown = [*group, item]
                fed = len(item[1]) - 1
                if not group or (
                    (mask.shape[1] + fed) * len(grown) <= _SCORE_TOKEN_BUDGET and fed * len(grown) <= _SCORE_LOGIT_ROWS
                ):
                    group = grown
                    continue
            self._score_rest(group, cache, mask, lengths, adapters)
            group = [item] if item is not None else []

    def _score_rest(
        self,
        group: list[tuple[int, list[int], list[float]]],
        cache: DynamicCache,
        prompt_mask: torch.Tensor,
        lengths: torch.Tensor,
        adapters: list[str | None],
    ) -> None:
        fed = max(len(c) for _, c, _ in group) - 1
        rows = torch.tensor([row for row, _, _ in group])
        device_rows = rows.to(self._device)
        sub = DynamicCache(config=self._model.config)
        for mine, theirs in zip(cache_layers(sub), cache_layers(cache), strict=True):
            keys, values = kv(theirs)
            mine.lazy_initialization(keys, values)
            mine.keys = keys.index_select(0, device_rows)
            mine.values = values.index_select(0, device_rows)
        # Continuation tokens follow the prompt's last real token; shorter ones are right-padded (causal attention:
        # padding after a token never reaches it).
        ids = torch.full((len(group), fed), self._pad_id, dtype=torch.long)
        tail = torch.zeros((len(group), fed), dtype=torch.long)
        for i, (_, c, _) in enumerate(group):
            ids[i, : len(c) - 1] = torch.tensor(c[:-1])
            tail[i, : len(c) - 1] = 1
        mask = torch.cat([prompt_mask[rows], tail], dim=1)
        positions = lengths[rows][:, None] + torch.arange(fed)[None, :]
        out = self._forward(
            [adapters[row] for row, _, _ in group],
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            past_key_values=sub,
            use_cache=True,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        for i, (_, c, result) in enumerate(group):
            targets = torch.tensor(c[1:], device=logprobs.device)
            result.extend(logprobs[i, : len(c) - 1].gather(1, targets[:, None]).squeeze(1).tolist())
