"""The page keeping what it shows right, in a real headless Chromium: cases
where the page's own reading of a batch (which rows it shows, where a new
one goes, whether the folders need listing again) must agree with the
console's listing, or a row or folder stays wrong until something else
makes the page list again.

Writes go straight to the servers (a PUB to both, as a client sends them),
so two of them land in the same tick of the console; the page has seen a
write once ``<body data-seq>`` reaches the sequence the active published.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.browser.conftest import start_console
from tests.browser.test_console_browser import by_id, cell, open_page, wait
from tests.integration.procs import (
    FAST_TIMING,
    HOST,
    SEQUENCE,
    Pair,
    Processes,
    kvset,
    recv,
)

pytestmark = pytest.mark.slow
TIME_LIMIT = 120


@pytest.fixture
def pair(procs: Processes) -> Any:
    with Pair(procs, FAST_TIMING) as pair:
        pair.start()
        pair.probe(pair.sub_primary)  # the writer is connected: nothing is lost
        yield pair


def servers_of(pair: Pair) -> list[str]:
    return [f"tcp://{HOST}:{pair.p1}", f"tcp://{HOST}:{pair.p2}"]


def write(pair: Pair, *items: tuple[bytes, bytes]) -> int:
    """Send ``items`` back to back (an empty value deletes); the sequence
    the active published for the last of them."""
    for key, value in items:
        pair.writer.send_multipart(kvset(key, value))
    deadline = time.monotonic() + 10
    while (frames := recv(pair.sub_primary, deadline - time.monotonic())) is not None:
        if len(frames) == 5 and frames[0] == items[-1][0]:
            sequence: int = SEQUENCE.unpack(frames[1])[0]
            return sequence
    raise TimeoutError(f"{items[-1][0]!r} was never published")


def seen(driver: Any, sequence: int) -> None:
    """Wait until the page has had the batch holding ``sequence``."""
    wait(
        driver,
        lambda d: (
            int(d.execute_script("return document.body.dataset.seq || -1")) >= sequence
        ),
        10,
        f"the page never had the batch of sequence {sequence}",
    )


def shown_keys(driver: Any) -> list[str]:
    """The keys of the rows, in order, as the page names them in URLs
    (WebDriver's JSON would turn a lone surrogate into U+FFFD)."""
    keys: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll('tbody tr'),"
        " tr => escapeText(tr.dataset.key));"
    )
    return keys


def test_a_filtered_page_never_keeps_a_stale_value(
    browser: Any, procs: Processes, pair: Pair
) -> None:
    """The console filtered with casefold() (``ß`` holds ``ss``), the page
    with toLowerCase() (it does not): the row listed never took updates."""
    _console, url = start_console(procs, servers_of(pair))
    write(pair, ("/f/straße".encode(), b"1"), (b"/f/STRASSE", b"1"))
    open_page(browser, url, "/f/")
    wait(browser, lambda d: cell(d, "/f/STRASSE", 1) == "1", 5, "no row")
    by_id(browser, "filter").send_keys("ss")
    wait(
        browser,
        lambda d: (
            d.execute_script("return view.filter") == "ss"
            and d.execute_script("return view.loading") == 0
        ),
        5,
        "the filter was never listed",
    )
    sequence = write(pair, ("/f/straße".encode(), b"2"), (b"/f/STRASSE", b"2"))
    seen(browser, sequence)
    wait(browser, lambda d: cell(d, "/f/STRASSE", 1) == "2", 5, "no update")
    assert cell(browser, "/f/straße", 1) in (None, "2")  # not listed, or right


def test_a_new_folder_shows_when_a_delete_elsewhere_kept_the_key_count(
    browser: Any, procs: Processes, pair: Pair
) -> None:
    """A key created in a new folder and one deleted outside the prefix in
    the same tick: the map's size is unchanged, yet the folder is new."""
    _console, url = start_console(procs, servers_of(pair))
    write(pair, (b"/a/old", b"1"), (b"/b/gone", b"1"))
    open_page(browser, url, "/a/")
    wait(browser, lambda d: cell(d, "/a/old", 1) == "1", 5, "no row")
    sequence = write(pair, (b"/a/new/k", b"1"), (b"/b/gone", b""))
    seen(browser, sequence)
    wait(
        browser,
        lambda d: d.find_elements("css selector", 'a[data-folder="/a/new/"]'),
        5,
        "the new folder /a/new/ never showed",
    )


def test_a_new_row_goes_where_the_console_sorts_it(
    browser: Any, procs: Processes, pair: Pair
) -> None:
    """By code point, as Python sorts: U+1F600 after U+E000 (in UTF-16,
    before it)."""
    _console, url = start_console(procs, servers_of(pair))
    write(pair, ("/s/\ue000".encode(), b"1"))
    open_page(browser, url, "/s/")
    wait(browser, lambda d: len(shown_keys(d)) == 1, 5, "no row")
    sequence = write(pair, ("/s/\U0001f600".encode(), b"2"))
    seen(browser, sequence)
    wait(browser, lambda d: len(shown_keys(d)) == 2, 5, "the new row never showed")
    assert shown_keys(browser) == ["%2Fs%2F%EE%80%80", "%2Fs%2F%F0%9F%98%80"]


def test_a_folder_and_key_that_are_not_utf8_can_be_browsed_and_edited(
    browser: Any, procs: Processes, pair: Pair
) -> None:
    _console, url = start_console(procs, servers_of(pair))
    write(pair, (b"/raw\xff/k\xfe", b"binary key"))
    open_page(browser, url, "")
    folder = """return Array.from(document.querySelectorAll('a[data-folder]'))
        .find(a => escapeText(a.dataset.folder) === '%2Fraw%FF%2F')"""
    wait(browser, lambda d: d.execute_script(folder), 5, "no folder /raw\\xff/")
    browser.execute_script(folder.replace("return ", "") + ".click()")
    wait(
        browser,
        lambda d: shown_keys(d) == ["%2Fraw%FF%2Fk%FE"],
        5,
        "the folder /raw\\xff/ did not list its key",
    )
    assert browser.execute_script("return location.hash") == "#%2Fraw%FF%2F"
    browser.execute_script("document.querySelector('tbody tr button.edit').click()")
    wait(
        browser,
        lambda d: by_id(d, "set-value").get_attribute("value") == "binary key",
        5,
        "editing a key that is not UTF-8 did not read its value",
    )
    # the URL of that folder opens it again
    browser.get("about:blank")
    open_page(browser, url, "%2Fraw%FF%2F")
    wait(
        browser,
        lambda d: shown_keys(d) == ["%2Fraw%FF%2Fk%FE"],
        5,
        "the folder's URL did not open it",
    )


def test_a_url_whose_prefix_is_not_utf8_still_opens_the_page(
    browser: Any, procs: Processes, pair: Pair
) -> None:
    """decodeURIComponent threw on ``#%FF``, and the page never connected."""
    _console, url = start_console(procs, servers_of(pair))
    open_page(browser, url, "%FF")
    assert browser.execute_script("return escapeText(view.prefix)") == "%FF"
