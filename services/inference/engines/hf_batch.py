"""The hf engine's batch state: one generation request as the step thread sees it (HFRequest), the running rows
and their shared, left-padded KV cache (Batch), and the small tensor and error helpers the step loop (hf.py) and
scoring (hf_score.py) share.

Only full-attention cache layers are handled (hf.py refuses other models at start): `cache_layers` and `kv` say so
to the type checker, and fail loudly if that ever stops being true.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.generation.logits_process import LogitsProcessorList

from genloom.services.inference.engine import EngineOutput, EngineRequest, SamplingOptions


@dataclass(eq=False)
class HFRequest:
    """One generation, shared by its asyncio consumer and the step thread (`done` and `running` under the lock)."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineOutput | BaseException]
    max_new_tokens: int
    eos_ids: frozenset[int]  # empty with ignore_eos
    token_ids: list[int]  # prompt + generated: what repetition penalty and min_new_tokens look at
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    generator: torch.Generator | None = None
    num_generated: int = 0
    running: bool = False
    done: bool = False

    @property
    def sampling(self) -> SamplingOptions:
        return self.request.sampling


class Batch:
    """The running rows and their shared KV cache. Row i's real tokens are the last `lengths[i]` cache columns."""

    def __init__(self) -> None:
        self.rows: list[HFRequest] = []
        self.cache: DynamicCache | None = None
        self.lengths = torch.zeros(0, dtype=torch.long)  # cached real tokens per row = its next position id
        self.next_tokens = torch.zeros(0, dtype=torch.long)  # the token each row feeds into the next step

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache = [], None
        self.lengths = self.next_tokens = torch.zeros(0, dtype=torch.long)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def merge(self, rows: list[HFRequest], cache: DynamicCache, lengths: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.cache is None:
            self.rows, self.cache, self.lengths, self.next_tokens = list(rows), cache, lengths, tokens
            return
        width = max(self.width, cache.get_seq_length())
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            (my_keys, my_values), (their_keys, their_values) = kv(mine), kv(theirs)
            mine.keys = torch.cat([left_pad(my_keys, width), left_pad(their_keys, width)])
            mine.values = torch.cat([left_pad(my_values, width), left_pad(their_values, width)])
        self.rows.extend(rows)
        self.lengths = torch.cat([self.lengths, lengths])
        self.next_tokens = torch.cat([self.next_tokens, tokens])

    def drop_done(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        assert self.cache is not None
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.lengths = self.lengths[index]
        self.next_tokens = self.next_tokens[index]
        # Columns left of the longest remaining row are padding for everyone: cut them so steps stay short.
        start = self.width - int(self.lengths.max())
        layers = cache_layers(self.cache)
        device_index = index.to(kv(layers[0])[0].device)
        for layer in layers:
            keys, values = kv(layer)
            layer.keys = keys.index_select(0, device_index)[:, :, start:]
            layer.values = values.index_select(0, device_index)[:, :, start:]

    def attention_mask(self, extra: int) -> torch.Tensor:
        """[rows, width + extra] mask for a step that appends `extra` tokens per row (left padding)."""
        total = self.width + extra
        return (torch.arange(total) >= (total - self.lengths - extra)[:, None]).long()


def device_error(exc: BaseException) -> bool:
    """An error that leaves the device unusable for every later request (a CUDA device-side assert, a lost
    device): the step thread must die so that the pool restarts the engine, instead of each request failing alone
    while health says SERVING. Out of memory is not one: freeing the request's tensors is enough."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the prompts' common prefix, leaving the shortest at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor


# One event for one request's queue: an output, or the error that ends its stream.
Delivery = tuple[asyncio.Queue[EngineOutput | BaseException], EngineOutput | BaseException]


def deliver(items: list[Delivery]) -> None:
    for q, item in items:
        q.put_nowait(item)


def cache_layers(cache: DynamicCache) -> list[CacheLayerMixin]:
    """The cache's layers: full-attention ones, each keeping its keys and values as [rows, heads, columns, dim]."""
    layers: list[CacheLayerMixin] = []
    for layer in cache.layers:
        assert isinstance(layer, CacheLayerMixin), type(layer)
        layers.append(layer)
    return layers


def kv(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values."""
    assert layer.keys is not None and layer.values is not None, "an empty cache layer"
    return layer.keys, layer.values
