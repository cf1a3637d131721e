"""Subtree tracking and heartbeats (trioclone.core.subtrees), no sockets."""

from __future__ import annotations

import pytest

from trioclone.core.chp import decode_kvmsg
from trioclone.core.subtrees import (
    MAX_PREFIX,
    PROVISIONAL,
    RULE_SUBSCRIPTION,
    Subtrees,
)
from trioclone.errors import RemoteProtocolError


def subscribe(subtrees: Subtrees, *prefixes: bytes) -> None:
    for prefix in prefixes:
        subtrees.on_subscription([b"\x01" + prefix])


def beats(subtrees: Subtrees) -> dict[bytes, str]:
    """Subtree -> its heartbeat's ``last``, checking each heartbeat's shape."""
    out = {}
    for frames in subtrees.heartbeats():
        msg = decode_kvmsg(frames)
        assert msg.key.endswith(b"\x00HUGZ") and msg.sequence == 0 and not msg.body
        out[msg.key[: -len(b"\x00HUGZ")]] = msg.properties["last"]
    return out


def test_the_last_update_under_each_subscribed_prefix() -> None:
    subtrees = Subtrees()
    subscribe(subtrees, b"/a/", b"/a/b/", b"/svc/")
    assert beats(subtrees) == {}  # nothing published under them yet
    subtrees.published(b"/a/b/1", 7)
    subtrees.published(b"/a/x", 8)
    subtrees.published(b"/other", 9)
    assert beats(subtrees) == {b"/a/": "8", b"/a/b/": "7"}
    subtrees.clear()  # a new role: a new history
    assert beats(subtrees) == {} and len(subtrees) == 3


def test_whole_map_and_hugz_subscriptions_are_not_tracked() -> None:
    subtrees = Subtrees()
    subscribe(subtrees, b"", b"HUGZ")
    assert len(subtrees) == 0 and subtrees.tracked == {}


def test_the_last_unsubscription_stops_the_tracking() -> None:
    subtrees = Subtrees()
    subscribe(subtrees, b"/a/", b"/b/")
    subtrees.on_subscription([b"\x00/a/"])
    subtrees.published(b"/a/1", 3)
    subtrees.published(b"/b/1", 4)
    assert beats(subtrees) == {b"/b/": "4"}
    subtrees.on_subscription([b"\x00/never/"])  # harmless
    assert len(subtrees) == 1


def test_prefixes_beyond_the_limit_are_counted_not_tracked() -> None:
    subtrees = Subtrees(limit=2)
    subscribe(subtrees, b"/a/", b"/b/", b"/c/", b"/a/")
    assert len(subtrees) == 2 and subtrees.untracked == 1


@pytest.mark.parametrize(
    "frames",
    [[b""], [b"\x02/a/"], [b"/a/"], [b"\x01/a/", b"extra"], []],
    ids=["empty", "bad-flag", "no-flag", "two-frames", "no-frames"],
)
def test_anything_else_from_the_xpub_is_a_rejection(frames: list[bytes]) -> None:
    subtrees = Subtrees()
    with pytest.raises(RemoteProtocolError) as raised:
        subtrees.on_subscription(frames)
    assert raised.value.rule == RULE_SUBSCRIPTION
    assert len(subtrees) == 0


def test_a_prefix_subscribed_again_starts_at_the_maps_sequence() -> None:
    # Found by the simulation (seed 14): a subscriber's SUB reconnected, so
    # the prefix was unsubscribed and subscribed again; tracked from 0, it
    # had no heartbeat, and the subscriber never learned that it missed the
    # last update under it.
    sequence = 12
    subtrees = Subtrees(sequence=lambda: sequence)
    subscribe(subtrees, b"/a/")
    subtrees.published(b"/a/1", 12)
    subtrees.on_subscription([b"\x00/a/"])
    sequence = 13  # /a/1 deleted at 13 while the subscriber was away
    subscribe(subtrees, b"/a/")
    assert beats(subtrees) == {b"/a/": "13"}


def test_a_subtree_tracked_by_a_snapshot_alone_is_forgotten() -> None:
    """A client that only asks for snapshots (or a stranger naming large
    subtrees) gets a few heartbeats, not heartbeats for ever."""
    subtrees = Subtrees(sequence=lambda: 5)
    subtrees.track(b"/snap/", snapshot=True)
    subtrees.track(b"/sub/", snapshot=True)
    subtrees.on_subscription([b"\x01/sub/"])  # its subscription came after
    for _ in range(PROVISIONAL):
        assert {f[0] for f in subtrees.heartbeats()} == {
            b"/snap/\x00HUGZ",
            b"/sub/\x00HUGZ",
        }
    assert {f[0] for f in subtrees.heartbeats()} == {b"/sub/\x00HUGZ"}
    assert list(subtrees.tracked) == [b"/sub/"]


def test_a_subscription_first_keeps_the_subtree_whatever_snapshots_follow() -> None:
    subtrees = Subtrees(sequence=lambda: 5)
    subtrees.on_subscription([b"\x01/a/"])
    subtrees.track(b"/a/", snapshot=True)
    for _ in range(PROVISIONAL + 2):
        assert [f[0] for f in subtrees.heartbeats()] == [b"/a/\x00HUGZ"]


def test_a_prefix_longer_than_the_limit_is_not_tracked() -> None:
    subtrees = Subtrees(sequence=lambda: 5)
    subtrees.on_subscription([b"\x01" + b"/" * (MAX_PREFIX + 1)])
    subtrees.track(b"/" * (MAX_PREFIX + 1), snapshot=True)
    assert not subtrees.tracked and subtrees.untracked == 2
    subtrees.on_subscription([b"\x01" + b"/" * MAX_PREFIX])
    assert len(subtrees.tracked) == 1
