"""Request checks and paging shared by the FineTuningService RPCs: id fields, the List requests' filters and order,
and pages of jobs or sweeps walked in creation order with tokens that remember the filters they were made for.

Used by servicer.py; the records themselves come from store.py (list_jobs / list_sweeps and their loaders).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from genloom.services.finetune.store import page_token, read_page_token
from genloom.services.server.errors import FieldViolation, InvalidArgument, quote

R = TypeVar("R")
DEFAULT_PAGE = 20
MAX_PAGE = 100


def check_id(value: str, pattern: re.Pattern[str], field: str, prefix: str) -> None:
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not pattern.match(value):
        raise InvalidArgument(
            f"{field}: {quote(value)} is not an id ({prefix} followed by 26 base32 characters)",
            [FieldViolation(field, "malformed id")],
        )


def check_listing(request: Any, states: Any, what: str) -> None:
    """A List request's state filters (0 is not a state) and order."""
    for i, state in enumerate(request.states):
        if state == 0 or state not in states.values():
            raise InvalidArgument.field(f"states[{i}]", f"{state} is not a {what} state to filter by")
    if request.order not in (0, 1, 2):
        raise InvalidArgument.field("order", f"{request.order} is not a SortOrder")


def page(
    size: int,
    token: str,
    filters: str,
    order: int,
    ids: Callable[[float | None, bool, int], list[tuple[str, float]]],
    load: Callable[[Sequence[str]], Sequence[R | None]],
    keep: Callable[[R], bool],
) -> tuple[list[R], str]:
    """One page of records: `ids(after, ascending, count)` lists ids by creation score, `load` reads them (None for
    one deleted meanwhile) and `keep` filters them. `filters` is the digest of the request's filters and order,
    which a page token must have been made with. Returns the records and the next page's token ("" at the end)."""
    size = min(size or DEFAULT_PAGE, MAX_PAGE)
    after: float | None = None
    if token:
        try:
            after, digest = read_page_token(token)
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument.field("page_token", "not a token from a previous page") from None
        if digest != filters:
            raise InvalidArgument.field("page_token", "the filters or order changed since the previous page")
    ascending = order == 2
    found: list[R] = []
    last = after
    while len(found) < size:
        batch = ids(last, ascending, max(size * 2, 50))
        if not batch:
            return found, ""
        for (_record_id, score), record in zip(batch, load([i for i, _ in batch]), strict=True):
            last = score
            if record is not None and keep(record):
                found.append(record)
                if len(found) == size:
                    break
    more = ids(last, ascending, 1)
    return found, page_token(last, filters) if more and last is not None else ""
