"""What ``CloneClient.watch`` yields: typed changes to the client's map."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def key_text(key: bytes) -> str:
    """Keys are shown as text; bytes that are not UTF-8 survive a round trip."""
    return key.decode("utf-8", "surrogateescape")


def key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class SetEvent:
    """``key`` now holds ``value`` (applied at ``sequence``)."""

    key: str
    value: bytes
    sequence: int


@dataclass(frozen=True)
class DeleteEvent:
    """``key`` was deleted, by a client or by its TTL expiring."""

    key: str
    sequence: int


@dataclass(frozen=True)
class ResyncEvent:
    """The map was reloaded from a snapshot (start-up, failover, missed updates).

    ``changes`` maps each key under the watched prefix whose value changed to
    its new value, or to None if it is gone; derived state should apply it.
    """

    server: str
    changes: Mapping[str, bytes | None]


CloneEvent = SetEvent | DeleteEvent | ResyncEvent
