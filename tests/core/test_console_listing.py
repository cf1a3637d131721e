"""What a console page shows of the map (``trioclone.console.listing``): pure."""

from __future__ import annotations

import base64

import pytest

from trioclone.console.listing import (
    SHOWN_BYTES,
    entry_row,
    folder_of,
    list_prefix,
    show_value,
    ttl_of,
)
from trioclone.core.client import Entry

KEYS = [
    "/app/db/host",
    "/app/db/port",
    "/app/name",
    "/app/web/",
    "/app/web/port",
    "/other",
    "top",
    "top/inner/leaf",
]


# -- list_prefix -------------------------------------------------------------


def test_the_root_groups_keys_into_their_first_folders() -> None:
    listing = list_prefix(KEYS, "")
    # a leading "/" does not make a folder "/" of its own
    assert listing.folders == [("/app/", 5), ("top/", 1)]
    assert listing.keys == ["/other", "top"]
    assert listing.total == len(KEYS)
    assert listing.leaves == 2  # the folders count their own keys


def test_a_folder_lists_its_leaves_and_subfolders_with_their_key_counts() -> None:
    listing = list_prefix(KEYS, "/app/")
    assert listing.folders == [("/app/db/", 2), ("/app/web/", 1)]
    # a key ending in "/" is a leaf where its last "/" ends it
    assert listing.keys == ["/app/name", "/app/web/"]
    assert (listing.total, listing.leaves) == (5, 2)


def test_a_key_ending_in_a_slash_is_listed_once_beside_its_folder() -> None:
    inside = list_prefix(KEYS, "/app/web/")
    assert inside.keys == ["/app/web/port"]  # not "/app/web/" itself again
    assert (inside.total, inside.leaves) == (1, 1)  # as its folder's count says
    assert list_prefix(KEYS, "/app/web/", "web").keys == ["/app/web/", "/app/web/port"]


def test_a_prefix_lists_only_the_keys_it_starts() -> None:
    listing = list_prefix(KEYS, "/app/db/")
    assert listing.folders == []
    assert listing.keys == ["/app/db/host", "/app/db/port"]
    assert (listing.total, listing.leaves) == (2, 2)
    assert list_prefix(KEYS, "/nothing/") == list_prefix([], "/nothing/")
    assert list_prefix([], "").total == 0


def test_leaves_come_sorted_whatever_the_order_of_the_keys() -> None:
    listing = list_prefix(reversed(KEYS), "/app/")
    assert listing.keys == ["/app/name", "/app/web/"]
    assert listing.folders == [("/app/db/", 2), ("/app/web/", 1)]


def test_a_filter_lists_matching_keys_flat_and_case_insensitively() -> None:
    listing = list_prefix(KEYS, "", "PORT")
    assert listing.folders == []
    assert listing.keys == ["/app/db/port", "/app/web/port"]
    assert (listing.total, listing.leaves) == (2, 2)  # flat: all are leaves


def test_a_filter_looks_only_under_the_prefix() -> None:
    assert list_prefix(KEYS, "/app/web/", "port").keys == ["/app/web/port"]
    assert list_prefix(KEYS, "/app/db/", "web").total == 0
    # the filter is matched against the whole key, prefix included
    assert list_prefix(KEYS, "/app/db/", "APP/DB").total == 2


def test_the_limit_cuts_the_leaves_but_not_the_total() -> None:
    keys = [f"k{i:03}" for i in range(10)]
    listing = list_prefix(keys, "", limit=3)
    assert listing.keys == ["k000", "k001", "k002"]
    assert (listing.total, listing.leaves) == (10, 10)
    filtered = list_prefix(keys, "", "k00", limit=2)
    assert filtered.keys == ["k000", "k001"]
    assert (filtered.total, filtered.leaves) == (10, 10)


def test_the_limit_cuts_the_folders_too_and_says_how_many_there_are() -> None:
    keys = [f"f{i}/x" for i in range(5)] + ["a", "b"]
    listing = list_prefix(keys, "", limit=2)
    assert listing.folders == [("f0/", 1), ("f1/", 1)]
    assert listing.subfolders == 5
    assert listing.keys == ["a", "b"]
    assert (listing.total, listing.leaves) == (7, 2)


@pytest.mark.parametrize(
    ("key", "prefix", "folder"),
    [
        ("a/b", "", "a/"),
        ("a/b/c", "", "a/"),
        ("a/b/c", "a/", "a/b/"),
        ("/a/b", "", "/a/"),
        ("/a", "", None),
        ("a", "", None),
        ("a/", "", None),
        ("a/b/", "a/", None),
        ("a/b/", "", "a/"),
        ("a/b", "a/", None),
    ],
)
def test_folder_of(key: str, prefix: str, folder: str | None) -> None:
    assert folder_of(key, prefix) == folder


# -- show_value --------------------------------------------------------------


def test_printable_text_is_shown_as_text() -> None:
    assert show_value(b"hello world") == {"n": 11, "v": "hello world", "e": "text"}
    text = "línea 1\n\tpaso ✓ 🎉"
    assert show_value(text.encode()) == {
        "n": len(text.encode()),
        "v": text,
        "e": "text",
    }


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\x01\x02",
        b"\xff\xfe",  # not UTF-8
        b"ok\x1bthen",  # an escape character
        b"line\r\n",  # a carriage return
        b"\x7f",
        "zero\u200bwidth".encode(),  # a format character: not printable
    ],
)
def test_a_value_that_is_not_printable_text_is_shown_as_base64(value: bytes) -> None:
    assert show_value(value) == {
        "n": len(value),
        "v": base64.b64encode(value).decode(),
        "e": "base64",
    }


def test_a_long_text_value_is_cut_and_says_so() -> None:
    value = b"x" * (SHOWN_BYTES + 10)
    assert show_value(value) == {
        "n": SHOWN_BYTES + 10,
        "v": "x" * SHOWN_BYTES,
        "e": "text",
        "cut": True,
    }
    assert "cut" not in show_value(b"x" * SHOWN_BYTES)


def test_a_long_binary_value_is_cut_and_says_so() -> None:
    value = bytes(range(256)) * (SHOWN_BYTES // 256 + 1)
    row = show_value(value)
    assert row == {
        "n": len(value),
        "v": base64.b64encode(value[:SHOWN_BYTES]).decode(),
        "e": "base64",
        "cut": True,
    }


@pytest.mark.parametrize("inside", [1, 2, 3])
def test_a_cut_inside_a_multibyte_character_is_still_text(inside: int) -> None:
    """The cut may fall inside a character: the shown part ends before it."""
    char = "🎉".encode()  # four bytes
    head = b"a" * (SHOWN_BYTES - inside)
    value = head + char + b"tail"
    row = show_value(value)
    assert row == {"n": len(value), "v": head.decode(), "e": "text", "cut": True}


def test_a_value_not_cut_must_decode_whole() -> None:
    """Only a cut value may end inside a character: a whole value ending in
    half a character is not text."""
    value = "é".encode()[:1]
    assert show_value(b"abc" + value)["e"] == "base64"


# -- entry_row and ttl_of ----------------------------------------------------


def entry(value: bytes, sequence: int = 7, **properties: str) -> Entry:
    return Entry(value, sequence, b"u" * 16, properties)


def test_a_row_holds_the_key_sequence_value_and_ttl_left() -> None:
    assert entry_row("k", entry(b"v"), None) == {
        "k": "k",
        "s": 7,
        "n": 1,
        "v": "v",
        "e": "text",
    }
    assert entry_row("k", entry(b"v"), 4.26)["t"] == 4.3


@pytest.mark.parametrize(
    ("properties", "ttl"),
    [
        ({}, None),
        ({"ttl": "0"}, None),
        ({"ttl": "5"}, 5.0),
        ({"ttl": "2.5"}, 2.5),
        ({"ttl": "-1"}, None),
        ({"ttl": "soon"}, None),
        ({"ttl": ""}, None),
        ({"ttl": "nan"}, None),
        ({"ttl": "inf"}, None),
        ({"ttl": "1700000000"}, None),  # a Guide server's absolute time
        ({"other": "5"}, None),
    ],
)
def test_ttl_of(properties: dict[str, str], ttl: float | None) -> None:
    assert ttl_of(properties) == ttl
