"""What a page shows of the map: a prefix's folders and keys, as rows.

Keys form a tree on ``/``: under a prefix, a key with no further ``/`` is a
leaf, any other groups into a folder (the text up to and including its
next ``/``).  A filter instead lists every key under the prefix that holds
the filter text, flat (case-insensitive: both lowered, as the page lowers
them).  Pure functions over the keys.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trioclone.core.client import Entry

#: Bytes of a value a row carries; a longer one is cut (``cut``: the page
#: asks for the whole value before editing it).
SHOWN_BYTES = 4096


@dataclass(frozen=True)
class Listing:
    """The folders and keys directly under a prefix (or matching a filter)."""

    folders: list[tuple[str, int]]  # (folder, keys under it), at most the limit
    subfolders: int  # folders in all
    keys: list[str]  # sorted, at most the limit
    total: int  # keys under the prefix (matching the filter)
    leaves: int  # of them, keys directly under it (all, with a filter)


def list_prefix(
    keys: Iterable[str], prefix: str, text: str = "", limit: int = 500
) -> Listing:
    """``keys`` under ``prefix``: its first ``limit`` folders and leaves, or
    with ``text``, the first ``limit`` keys holding it, in key order."""
    folders: dict[str, int] = {}
    leaves: list[str] = []
    total = 0
    needle = text.lower()  # as the page's toLowerCase(): both Unicode's mapping
    for key in keys:
        if not key.startswith(prefix):
            continue
        if key == prefix and prefix and not needle:
            continue  # a leaf one level up, where its folder's count leaves it out
        if needle:
            if needle in key.lower():
                total += 1
                leaves.append(key)
            continue
        total += 1
        folder = folder_of(key, prefix)
        if folder is None:
            leaves.append(key)
        else:
            folders[folder] = folders.get(folder, 0) + 1
    leaves.sort()
    named = sorted(folders.items())
    return Listing(named[:limit], len(named), leaves[:limit], total, len(leaves))


def folder_of(key: str, prefix: str) -> str | None:
    """The folder under ``prefix`` that holds ``key``, or None for a leaf."""
    slash = key.find("/", len(prefix) + 1)
    if slash < 0 or slash == len(key) - 1:
        return None
    return key[: slash + 1]


def show_value(value: bytes, shown_bytes: int = SHOWN_BYTES) -> dict[str, object]:
    """A value for the page: ``v`` as text if it is printable UTF-8, else
    base64 (``e`` says which); ``n`` its size; ``cut`` if ``v`` is partial
    (its first ``shown_bytes``: text or not is said of those alone)."""
    shown = value[:shown_bytes]
    row: dict[str, object] = {"n": len(value)}
    text = _text(shown, cut=len(value) > len(shown))
    if text is not None and _printable(text):
        row.update(v=text, e="text")
    else:
        row.update(v=base64.b64encode(shown).decode(), e="base64")
    if len(value) > len(shown):
        row["cut"] = True
    return row


def _text(shown: bytes, *, cut: bool) -> str | None:
    """``shown`` as UTF-8, or None; a cut value may end inside a character."""
    for trim in range(4 if cut else 1):
        try:
            return shown[: len(shown) - trim].decode()
        except UnicodeDecodeError:
            continue
    return None


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\t" for c in text)


def entry_row(
    key: str, entry: Entry, ttl_left: float | None, shown_bytes: int = SHOWN_BYTES
) -> dict[str, object]:
    """A key's row: ``k`` key, ``s`` sequence, ``t`` seconds left (or
    absent), and its value as ``show_value`` gives it."""
    row: dict[str, object] = {
        "k": key,
        "s": entry.sequence,
        **show_value(entry.value, shown_bytes),
    }
    if ttl_left is not None:
        row["t"] = round(ttl_left, 1)
    return row


def ttl_of(properties: Mapping[str, str]) -> float | None:
    """The ``ttl`` property in seconds, or None when there is none, it is
    0 ("never") or it is not a number a page could count down."""
    try:
        ttl = float(properties.get("ttl", "0"))
    except ValueError:
        return None
    return ttl if 0 < ttl < 1e9 else None  # a Guide server's absolute time: no
