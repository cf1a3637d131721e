"""A page's queue of messages: bounded in messages and in characters, so a
page that stops reading is dropped before it holds much memory."""

from __future__ import annotations

from trioclone.console.hub import PAGE_CHARS, PAGE_QUEUE, PageStream


async def test_a_page_that_stops_reading_holds_at_most_page_chars() -> None:
    page = PageStream()
    big = "x" * (PAGE_CHARS // 4)
    assert [page.offer(big) for _ in range(5)] == [True] * 4 + [False]
    assert await page.__anext__() == big  # read one: room for one more
    assert page.offer(big)
    assert not page.offer("y")


async def test_a_page_holds_at_most_page_queue_messages() -> None:
    page = PageStream()
    assert all(page.offer("m") for _ in range(PAGE_QUEUE))
    assert not page.offer("m")


async def test_a_dropped_page_gets_what_was_queued_then_ends() -> None:
    page = PageStream()
    page.offer("a")
    page.drop()
    assert [message async for message in page] == ["a"]


async def test_a_page_that_went_away_takes_nothing_more() -> None:
    page = PageStream()
    await page.close()
    assert page.gone
    assert not page.offer("a")
