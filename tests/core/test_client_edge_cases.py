"""ClientCore in cases that could leave a client with a wrong map
without it noticing, or that crash it.  Literal times, no sockets."""

from __future__ import annotations

from tests.core.test_client_core import actions, kv, synced, take, values
from trioclone.core.chp import hugz, kthxbai, subtree_hugz
from trioclone.core.client import ClientCore, Connect, Phase, Request


def test_a_subtree_stream_that_went_live_after_the_snapshot_is_noticed():
    """The snapshot request reached the server before the SUB's subscription
    did (two connections: nothing orders them).  The server published /a/x at
    6 in between, then /a/y at 7, which is the first thing the client hears.
    The stream is live from 6 and the snapshot ends at 5 (the snapshot's
    sequence counts, not the one after the backlog): update 6 may be lost,
    so the client snapshots again."""
    core = ClientCore(1, [b"/a/"])
    core.poll(0.0)
    take(core)
    core.on_update(kv(b"/a/y", 7, b"y"), 0.1)  # first word on the stream
    core.on_reply(kthxbai(5, b"/a/"), 0.2)  # the snapshot ends at 5
    # live from 6 > 5: update 6 may be missing, so it snapshots again at once
    assert actions(core) == [Request(b"/a/")]
    assert core.phase is Phase.SYNCING
    core.on_reply(kv(b"/a/x", 6, b"x"), 0.3)
    core.on_reply(kv(b"/a/y", 7, b"y"), 0.3)
    core.on_reply(kthxbai(7, b"/a/"), 0.3)
    core.on_update(subtree_hugz(b"/a/", 7), 1.0)  # the last update under /a/: 7
    assert actions(core) == [] and core.phase is Phase.ACTIVE
    assert values(core) == {b"/a/x": b"x", b"/a/y": b"y"}


def test_a_guide_server_that_restarted_is_noticed_at_its_first_hugz():
    """The Guide's servers send HUGZ with their current sequence, so a
    restarted one sends HUGZ 0 until someone writes.  On a connection whose
    HUGZ carried a sequence before, a HUGZ 0 below it is a reset (an RFC
    server, whose HUGZ are always 0, never triggers this)."""
    core = synced([(b"/k", 5, b"v")], 5, servers=1)
    core.on_update(hugz(5), 0.5)  # this server sends the reference HUGZ
    core.on_update(kv(b"/j", 6, b"w"), 0.7)
    core.on_update(hugz(6), 1.5)
    assert actions(core) == []
    # The server restarts, empty: its HUGZ now carry sequence 0.
    for t in (2.5, 3.5, 4.5, 5.5):
        core.on_update(hugz(0), t)
    assert Request(b"") in actions(core), f"still serving {values(core)}"


def test_overlapping_subtrees_do_not_bring_back_a_deleted_key():
    """``open_client(servers, subtree=["/a/b/", "/a/"])``: "/a/b/" is inside
    "/a/", so the client asks for "/a/" alone.  (Two snapshots of one key at
    different sequences would disagree: a key deleted between them would
    stay in the map for ever.)"""
    core = ClientCore(1, [b"/a/b/", b"/a/"])
    assert core.subtrees == (b"/a/",)  # /a/b/ is inside /a/: one snapshot
    core.poll(0.0)
    assert take(core)[0][-1] == Request(b"/a/")
    core.on_reply(kv(b"/a/b/x", 3, b"v"), 0.1)
    core.on_update(hugz(10), 0.1)
    core.on_reply(kthxbai(10, b"/a/"), 0.1)
    core.on_update(kv(b"/a/b/x", 12), 0.2)  # deleted later
    assert core.phase is Phase.ACTIVE
    assert b"/a/b/x" not in values(core)
    assert ClientCore(1, [b"/a/", b""]).subtrees == (b"",)
    assert ClientCore(1, [b"/b/", b"/a/", b"/b/"]).subtrees == (b"/b/", b"/a/")


def test_a_map_changed_between_two_subtrees_is_snapshotted_again_at_once():
    """A client of /a/ and /b/ gets /a/'s snapshot from map L1, then /b/'s
    from map L2 (the server restarted in between).  That KTHXBAI answered the
    request in flight, so the same connection asks again at once."""
    core = ClientCore(1, [b"/a/", b"/b/"])
    core.poll(0.0)
    actions(core)
    core.on_reply(kv(b"/a/1", 2, b"old"), 0.0)
    core.on_reply(kthxbai(4, b"/a/", {"lineage": "1" * 32}), 0.0)
    assert actions(core) == [Request(b"/b/")]
    core.on_reply(kthxbai(3, b"/b/", {"lineage": "2" * 32}), 0.1)  # restarted
    assert actions(core) == [Request(b"/a/")]  # the map changed: again
    core.on_reply(kv(b"/a/1", 1, b"new"), 0.2)
    core.on_reply(kthxbai(3, b"/a/", {"lineage": "2" * 32}), 0.2)
    assert actions(core) == [Request(b"/b/")], "the fresh reply was skipped"
    core.on_reply(kthxbai(3, b"/b/", {"lineage": "2" * 32}), 0.2)
    assert core.phase is Phase.ACTIVE
    assert values(core) == {b"/a/1": b"new"}


def test_a_server_that_restarts_before_answering_is_snapshotted_again_at_once():
    """The client asked for a snapshot; the server restarted before answering
    (the request died with the old process).  The new server's first HUGZ
    carries another lineage: a reset.  The old request will never be
    answered, so the client asks on a new connection, and syncs at once from
    what comes (not after a request timeout and a back-off)."""
    core = ClientCore(1, [b""])
    core.poll(0.0)
    actions(core)
    core.on_update(hugz(5, {"lineage": "1" * 32}), 0.1)  # the old server
    # ... restarts before answering; the new one sends its first HUGZ.
    core.on_update(hugz(0, {"lineage": "2" * 32}), 0.5)
    assert actions(core) == [Connect(0), Request(b"")]  # a new DEALER
    core.on_reply(kv(b"/new", 1, b"n"), 0.6)
    core.on_reply(kthxbai(1, b"", {"lineage": "2" * 32}), 0.6)
    assert core.phase is Phase.ACTIVE, "the new server's reply was skipped"
    assert values(core) == {b"/new": b"n"}
