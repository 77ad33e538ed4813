"""Pages of list calls: `Page` (sync), `AsyncPage` and `AsyncPager` (asyncio). Iterating one walks every page,
fetching the next when reached. Returned by the fine-tuning jobs and sweeps resources.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from genloom._exceptions import GenLoomError

T = TypeVar("T")


class Page(Generic[T]):
    """One page of a list call. Iterating it yields every item of this page and of the pages after it (each
    fetched when reached); `data` is this page's items only."""

    def __init__(self, data: builtins.list[T], next_page_token: str, fetch: Callable[[str], Page[T]]) -> None:
        self.data = data
        """This page's items."""
        self.next_page_token = next_page_token
        """The token of the next page ("" on the last page)."""
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return bool(self.next_page_token)

    def get_next_page(self) -> Page[T]:
        """Fetch the next page (a GenLoomError on the last page)."""
        if not self.next_page_token:
            raise GenLoomError("this is the last page")
        return self._fetch(self.next_page_token)

    def iter_pages(self) -> Iterator[Page[T]]:
        """This page and every page after it."""
        page: Page[T] = self
        yield page
        while page.has_next_page():
            page = page.get_next_page()
            yield page

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data


class AsyncPage(Generic[T]):
    """`Page` for asyncio: `async for item in page` yields every item of this and the following pages."""

    def __init__(
        self, data: builtins.list[T], next_page_token: str, fetch: Callable[[str], Awaitable[AsyncPage[T]]]
    ) -> None:
        self.data = data
        """This page's items."""
        self.next_page_token = next_page_token
        """The token of the next page ("" on the last page)."""
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return bool(self.next_page_token)

    async def get_next_page(self) -> AsyncPage[T]:
        """Fetch the next page (a GenLoomError on the last page)."""
        if not self.next_page_token:
            raise GenLoomError("this is the last page")
        return await self._fetch(self.next_page_token)

    async def iter_pages(self) -> AsyncIterator[AsyncPage[T]]:
        """This page and every page after it."""
        page: AsyncPage[T] = self
        yield page
        while page.has_next_page():
            page = await page.get_next_page()
            yield page

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item


class AsyncPager(Generic[T]):
    """What the async `list()` methods return: `await` it for the first `AsyncPage`, or `async for` over it
    directly for every item of every page."""

    def __init__(self, first: Callable[[], Awaitable[AsyncPage[T]]]) -> None:
        self._first = first

    def __await__(self) -> Generator[Any, None, AsyncPage[T]]:
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item
