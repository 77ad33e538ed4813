"""The bounded cache behind every cache keyed on what clients send."""

from __future__ import annotations

import pytest

from genloom.services.server.lru import LRUCache


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # read: now the most recent
    cache.put("c", 3)
    assert (cache.get("b"), cache.get("a"), cache.get("c"), len(cache)) == (None, 1, 3, 2)
    cache.put("a", 4)  # rewritten: most recent again, still one entry
    cache.put("d", 5)
    assert (cache.get("c"), cache.get("a"), len(cache)) == (None, 4, 2)


def test_a_cache_needs_room() -> None:
    with pytest.raises(ValueError):
        LRUCache(0)
