"""Live fuzzing: malformed traffic against every socket of a running pair.

One primary and one backup, real ``trioclone serve`` processes on
127.0.0.1, are started once for the module and kept running while
Hypothesis sends them examples.  An example is a few actions: garbage on
one socket or another, interleaved with valid writes.  After each example:

* both processes are alive;
* the active's collector still works: a barrier write comes back published
  with exactly the next sequence (no rejected message took one);
* the active answers a snapshot, and it holds exactly what the valid
  writes made, sequence included (no rejected message changed the map);
* the active's HUGZ and both servers' Binary Star heartbeats keep coming
  (never a gap over ``HEARTBEAT_GAP``), and the states are still ACTIVE
  and PASSIVE (nothing made the pair fail over);
* each server's resident memory (VmRSS) stays within ``RSS_GROWTH_MB`` of
  what it was before the first example.

The last test of the module sends a fixed set of garbage to every socket,
then checks the logs (each socket a stranger can reach logged its
rejections; no traceback, no error), that the passive holds the active's
map (same sequence and key count) and no pending write, and that it takes
over with exactly the map the valid writes made.

Examples: ``TRIOCLONE_FUZZ_EXAMPLES`` (300 by default; ``nox -s fuzz`` runs
5,000).  Deterministic: derandomized, no example database.  No shrinking
(the servers carry their state from one example to the next, so a smaller
example would not replay a failure) unless ``TRIOCLONE_FUZZ_SHRINK=1``.

What a stranger can reach
-------------------------
A server with base port P and Binary Star state port S:

* P, the ROUTER (bound): any DEALER, with any routing id, including one
  that starts with the peer's prefix (``trioclone-peer:``: the server then
  takes its requests for its peer's, which are no votes, and a request for
  the window, ``\x00history``, tells an active that its map was copied,
  so no longer ``fresh``).  Fuzzed with
  requests of every wrong shape, kvmsgs, random frames, large frames, and
  valid requests for a fixed set of small subtrees (on the passive, votes
  that it refuses while its peer is alive).
* P+1, the XPUB (bound): a SUB, or an XSUB that sends anything upstream;
  libzmq hands up all but subscriptions to a prefix already subscribed
  (and unsubscriptions while others remain), and the server reads each as
  a subscription.  Fuzzed with XSUB messages:
  subscriptions (prefixes up to 1 MB: the server disconnects a subscriber
  that sends one over 64 KB), unsubscriptions, other bytes, several
  frames.
* P+2, the collector SUB (bound): any PUB.  Fuzzed with KVSETs that break
  each rule (frame count, empty or reserved key, sequence and UUID sizes,
  properties: not UTF-8, no ``=``, no name, huge, ``ttl`` nan, negative,
  infinite or too large, hand-over forms with a bad ``expired``, window
  hand-overs of another map), random frames, and many frames.  What only
  the peer should send is taken from anyone too (no authentication): a
  write with a sequence and a lineage is a hand-over, and a window of
  UUIDs with the pair's lineage (which every HUGZ carries) goes into the
  active's window of repeats.
* S, the Binary Star state PUB (bound): a SUB or XSUB, but a PUB hands
  nothing up (libzmq keeps subscriptions while the subscriber is connected
  and drops anything else), so the server never reads it.  Fuzzed with
  XSUB messages all the same; nothing can be rejected there.
* Each of those ports over raw TCP: bytes that are not ZMTP, or that break
  it after a valid greeting (bad socket type, bad frames, a frame that
  claims to be huge).  libzmq drops such a connection; the server never
  sees it.

Not reachable, so not fuzzed: the state SUB and the SUB for the peer's
HUGZ (they connect to the peer's state port and publisher), the relay PUB
(it connects to the peer's collector) and the passive's DEALER and SUB to
the active: connecting sockets accept no connection.  To reach them a
stranger would have to bind the peer's ports (taken while the peer runs)
or sit on the path (there is no authentication, see the README).  What a
stranger can put in the peer's stream is what the peer accepts from
clients: valid writes, also with properties trioclone uses elsewhere
(``lineage``, ``branch``, ``fresh``, ``expired``, ``last``, ``count``,
``age``) and in hand-over form; the valid traffic sends those, and the
passive mirrors them.  A message of no frames cannot be sent at all (ZMTP
has none: the fewest is one empty frame).

Left out on purpose: valid snapshot requests for many or large subtrees
(each is tracked for subtree heartbeats and never forgotten; see
``test_stranger_memory.py``), and valid writes sent to one server only (the
passive holds them on its pending list, by design, and would replay them
at a takeover).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import os
import random
import socket
import sqlite3
import struct
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from zmq.utils.monitor import recv_monitor_message

from tests.integration.procs import (
    HOST,
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    Pair,
    Processes,
    ServerProcess,
    destroy,
    open_socket,
    request_snapshot,
    tcp,
    time_limit,
    vote_until_snapshot,
    wait_snapshot,
)
from trioclone.core.bstar import State, decode_state
from trioclone.core.chp import (
    HISTORY,
    LINEAGE,
    SUBTREE_HUGZ,
    decode_kvmsg,
    decode_request,
    is_reserved,
)
from trioclone.core.server import EXPIRED, PEER_IDENTITY
from trioclone.errors import RemoteProtocolError

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TRIOCLONE_FUZZ_EXAMPLES", "300"))
SHRINK = os.environ.get("TRIOCLONE_FUZZ_SHRINK") == "1"
#: How much a server's VmRSS may grow over the run (MB).
RSS_GROWTH_MB = int(os.environ.get("TRIOCLONE_FUZZ_RSS_MB", "150"))
#: The longest silence allowed between two HUGZ of the active, or two Binary
#: Star heartbeats of either server (both are sent every second).
HEARTBEAT_GAP = 3.0
#: How long a barrier write may take to come back published.
BARRIER_TIMEOUT = 10.0
#: A hard limit on the whole module (a hang fails, it does not block).
TIME_LIMIT = 120 + EXAMPLES // 2
SEQUENCE = struct.Struct("!q")
Context = zmq.Context[zmq.Socket[bytes]]
Frames = list[bytes]


def data_dir_digest(data_home: Path, role: str) -> str:
    """A digest of what the server ``role`` keeps in its data folder (under
    ``data_home``, its XDG_DATA_HOME), read as another process would: the
    map's lineage, sequence, branch and history, every key's record and
    deadline, and the window's UUIDs (not which table set holds them, nor
    the times a resync of the same map writes again)."""
    (path,) = data_home.glob(f"trioclone/{role}-*/map.sqlite3")
    digest = hashlib.sha256()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        current, *meta = db.execute(
            "SELECT current, lineage, sequence, branch, history FROM meta"
        ).fetchone()
        digest.update(repr(meta).encode())
        for row in db.execute(f"SELECT * FROM kv{current} ORDER BY key"):
            digest.update(repr(row).encode())
        uuids = b"".join(
            r[0] for r in db.execute(f"SELECT uuids FROM applied{current}")
        )
        window = sorted({uuids[i : i + 16] for i in range(0, len(uuids), 16)})
        digest.update(b"".join(window))
    return digest.hexdigest()


def settled_digests(live: Live, timeout: float = 10.0) -> dict[str, str]:
    """Each server's ``data_dir_digest`` once the passive has committed
    all the active has (it mirrors asynchronously): two reads in a row
    that agree."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        now = {name: data_dir_digest(live.data_home, name) for name in live.procs}
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    raise TimeoutError("the data folders kept changing with no valid writes")


# -- large frames, drawn small -------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A large frame that Hypothesis draws (and prints) small: ``size``
    random bytes from ``seed`` (or ``size`` times the byte ``fill``),
    between ``prefix`` and ``suffix``."""

    size: int
    seed: int = 0
    prefix: bytes = b""
    suffix: bytes = b""
    fill: int | None = None

    def __bytes__(self) -> bytes:
        if self.fill is None:
            middle = random.Random(self.seed).randbytes(self.size)
        else:
            middle = bytes([self.fill]) * self.size
        return self.prefix + middle + self.suffix

    def __len__(self) -> int:
        return len(self.prefix) + self.size + len(self.suffix)


Frame = bytes | Blob


def materialize(frames: Sequence[Frame]) -> Frames:
    return [bytes(frame) for frame in frames]


def size_of(frames: Sequence[Frame]) -> int:
    return sum(len(frame) for frame in frames)


# -- what the servers reject -----------------------------------------------------


def collector_rejects(frames: Frames) -> bool:
    """Would a server reject these frames on its collector?  (No: they would
    be applied, or dropped as a hand-over of its own map.)  By the codec's
    rules, which ``tests/core`` checks against the spec."""
    try:
        msg = decode_kvmsg(frames)
    except RemoteProtocolError:
        return True
    if msg.key == HISTORY and msg.sequence and LINEAGE in msg.properties:
        # a window hand-over: rejected unless it names the pair's lineage,
        # which no example does (it is drawn at random)
        return True
    if is_reserved(msg.key):
        return True
    if msg.sequence and LINEAGE in msg.properties and EXPIRED in msg.properties:
        try:
            int(msg.properties[EXPIRED])
        except ValueError:
            return True
    return False


def snapshot_rejects(frames: Frames) -> bool:
    try:
        decode_request(frames)
    except RemoteProtocolError:
        return True
    return False


# -- strategies -----------------------------------------------------------------

INTERESTING: list[bytes] = [
    b"",
    ICANHAZ,
    HUGZ,
    KTHXBAI,
    HISTORY,
    SUBTREE_HUGZ,
    b"/a/",
    b"/valid/0",
    bytes(8),
    SEQUENCE.pack(-1),
    SEQUENCE.pack(2**63 - 1),
    bytes(16),
    b"\x00",
    b"\x01",
    b"\x01/a/",
    b"\x00/a/",
    b"\x01HUGZ",
    b"ttl=5\n",
    b"ttl=nan\n",
    b"ttl=inf\n",
    b"ttl=-1\n",
    b"ttl=1e999\n",
    b"ttl\n",
    b"=x\n",
    b"a=\xff\n",
    b"lineage=x\nexpired=y\n",
    b"\xff" * 64,
]
BIG_SIZES = [300, 4096, 65_537, 262_144, 1_048_576]

small_frames = st.one_of(st.binary(max_size=48), st.sampled_from(INTERESTING))
big_frames = st.builds(
    Blob,
    st.one_of(st.sampled_from(BIG_SIZES), st.integers(1024, 1_048_576)),
    st.integers(0, 2**32 - 1),
)


@st.composite
def frame_lists(draw: st.DrawFn, max_frames: int = 8) -> list[Frame]:
    """A message of random frames: 1 to ``max_frames``, or many (up to 300);
    one in eight has a large frame in it."""
    if draw(st.integers(0, 9)) == 0:
        count = draw(st.integers(max_frames + 1, 300))
        pattern = draw(st.sampled_from([b"", b"x", ICANHAZ, HUGZ, bytes(8)]))
        return [pattern] * count
    frames: list[Frame] = list(
        draw(st.lists(small_frames, min_size=1, max_size=max_frames))
    )
    if draw(st.integers(0, 7)) == 0:
        frames[draw(st.integers(0, len(frames) - 1))] = draw(big_frames)
    return frames


valid_keys = st.builds(lambda n: b"/valid/%d" % n, st.integers(0, 31))
fuzz_keys = st.one_of(
    valid_keys, st.binary(min_size=1, max_size=24).map(lambda k: b"/fuzz/" + k)
)
foreign_lineages = st.text("0123456789abcdef", min_size=1, max_size=32)
not_integers = st.sampled_from(
    ["", "x", "1.5", "nan", "1e3", "0x10", "--1", "1 2", "9" * 5000]
)
bad_ttls = st.sampled_from(
    [
        "nan",
        "NaN",
        "-nan",
        "inf",
        "-inf",
        "Infinity",
        "-1",
        "-0.5",
        "-1e-300",
        "1e309",
        "9" * 400,
        "",
        "abc",
        "0x10",
        "1,5",
        "5 s",
        "\u221e",
    ]
)


def _set(frames: list[Frame], index: int, value: Frame) -> list[Frame]:
    copy = list(frames)
    copy[index] = value
    return copy


@st.composite
def bad_properties(draw: st.DrawFn) -> Frame:
    """A properties frame a server must reject."""
    kind = draw(st.integers(0, 7))
    if kind == 0:  # not UTF-8
        return draw(
            st.sampled_from(
                [
                    b"\xff\xfe=1\n",
                    b"a=\xc3\x28\n",
                    b"name=\xed\xa0\x80\n",  # a surrogate
                    b"\x80",
                    b"ttl=1\n\xc0\xaf=x\n",
                ]
            )
        )
    if kind == 1:  # a line without '='
        return draw(st.sampled_from([b"ttl\n", b"noequals", b"a=1\nb\n", b"\n\n"]))
    if kind == 2:  # a line without a name
        return draw(st.sampled_from([b"=x\n", b"a=1\n=2\n", b"=\n"]))
    if kind == 3:  # huge: up to a megabyte with no '=' in it
        return Blob(draw(st.sampled_from([65_536, 1_048_576])), fill=ord("p"))
    if kind == 4:  # a ttl that is not a finite, non-negative number
        ttl = draw(bad_ttls)
        before = draw(st.sampled_from([b"", b"ttl=5\n", b"owner=x\n"]))
        return before + b"ttl=%s\n" % ttl.encode()
    if kind == 5:  # a ttl of a megabyte of digits (infinite)
        return Blob(1_048_576, prefix=b"ttl=", suffix=b"\n", fill=ord("9"))
    if kind == 6:  # a blank line in the middle
        return b"a=1\n\nb=2\n"
    # random bytes that are not valid properties (the filter below checks)
    return draw(st.binary(min_size=1, max_size=64))


@st.composite
def broken_kvsets(draw: st.DrawFn) -> list[Frame]:
    """A KVSET with at least one rule broken, built from a valid one."""
    frames: list[Frame] = [
        draw(fuzz_keys),
        SEQUENCE.pack(draw(st.integers(-(2**63), 2**63 - 1))),
        draw(st.sampled_from([b"", bytes(range(16))])),
        draw(st.sampled_from([b"", b"ttl=0\n", b"owner=x\n"])),
        draw(st.binary(max_size=32)),
    ]
    breaks = draw(
        st.lists(st.integers(0, 6), min_size=1, max_size=3, unique=True).map(sorted)
    )
    for rule in breaks:
        if rule == 0:  # an empty key
            frames = _set(frames, 0, b"")
        elif rule == 1:  # a reserved key
            key = draw(
                st.sampled_from(
                    [HUGZ, KTHXBAI, HISTORY, SUBTREE_HUGZ, b"/a/" + SUBTREE_HUGZ]
                )
            )
            frames = _set(frames, 0, key)
        elif rule == 2:  # a sequence frame of the wrong size
            size = draw(st.one_of(st.integers(0, 7), st.integers(9, 64)))
            frames = _set(frames, 1, bytes(size))
        elif rule == 3:  # a UUID frame of the wrong size
            size = draw(st.one_of(st.integers(1, 15), st.integers(17, 64)))
            frames = _set(frames, 2, b"u" * size)
        elif rule == 4:  # properties
            frames = _set(frames, 3, draw(bad_properties()))
        elif rule == 5:  # a hand-over (a sequence, a lineage) with a bad expiry
            expired = draw(not_integers)
            lineage = draw(foreign_lineages)
            props = f"lineage={lineage}\nexpired={expired}\n".encode()
            frames = _set(frames, 1, SEQUENCE.pack(draw(st.integers(1, 2**40))))
            frames = _set(frames, 3, props)
        else:  # a window hand-over from another map, or a malformed one
            lineage = draw(foreign_lineages)
            age = draw(st.sampled_from(["0", "1.5", "nan", "-1", "x"]))
            body = draw(st.one_of(st.binary(max_size=40), big_frames))
            frames = [
                HISTORY,
                SEQUENCE.pack(draw(st.integers(1, 2**40))),
                b"",
                f"lineage={lineage}\nage={age}\n".encode(),
                body,
            ]
    if draw(st.integers(0, 4)) == 0:  # and the wrong number of frames
        count = draw(st.one_of(st.integers(1, 4), st.integers(6, 40)))
        extra = draw(st.lists(small_frames, min_size=count, max_size=count))
        frames = (frames + extra)[:count]
    return frames


@st.composite
def collector_garbage(draw: st.DrawFn) -> list[Frame]:
    return draw(
        st.one_of(broken_kvsets(), frame_lists()).filter(
            lambda frames: collector_rejects(materialize(frames))
        )
    )


SUBTREES = [
    b"",
    b"/",
    b"/valid/",
    b"/valid/1",
    b"/fuzz/",
    b"/a/b/",
    HISTORY,
    HUGZ,
    b"HUGZ/",
    KTHXBAI,
    SUBTREE_HUGZ,
    b"\x00",
    b"\xff\xfe/",
]


@st.composite
def snapshot_garbage(draw: st.DrawFn) -> list[Frame]:
    """What a stranger sends the ROUTER: malformed requests, mostly."""
    kind = draw(st.integers(0, 5))
    if kind == 0:  # valid, for a subtree of a small fixed set
        return [ICANHAZ, draw(st.sampled_from(SUBTREES))]
    if kind == 1:  # ICANHAZ with the wrong number of frames
        count = draw(st.sampled_from([1, 3, 4, 5, 50]))
        rest = draw(st.lists(small_frames, min_size=count - 1, max_size=count - 1))
        return [ICANHAZ, *rest]
    if kind == 2:  # another command, in two frames
        command = draw(
            st.sampled_from(
                [b"icanhaz?", b"ICANHAZ", ICANHAZ + b"\x00", b"", KTHXBAI, HUGZ]
            )
        )
        return [command, draw(st.one_of(small_frames, big_frames))]
    if kind == 3:  # a REQ socket's envelope
        return [b"", ICANHAZ, draw(small_frames)]
    if kind == 4:  # a kvmsg
        return draw(broken_kvsets())
    return draw(frame_lists().filter(lambda f: snapshot_rejects(materialize(f))))


identities = st.one_of(
    st.none(),
    st.binary(min_size=1, max_size=16).map(lambda r: PEER_IDENTITY + r),
    st.binary(min_size=1, max_size=255),
    st.sampled_from([b"\x00", b"\x00abc", b"\xff" * 255, PEER_IDENTITY]),
)


@st.composite
def xsub_messages(draw: st.DrawFn) -> list[Frame]:
    """What a stranger's XSUB sends upstream to a PUB or XPUB."""
    kind = draw(st.integers(0, 4))
    if kind == 0:  # a subscription or unsubscription, its prefix up to 1 MB
        flag = draw(st.sampled_from([b"\x00", b"\x01"]))
        prefix = draw(st.one_of(small_frames, big_frames))
        if isinstance(prefix, Blob):
            return [Blob(prefix.size, prefix.seed, prefix=flag)]
        return [flag + prefix]
    if kind == 1:  # an empty message
        return [b""]
    if kind == 2:  # neither
        first = draw(st.binary(min_size=1, max_size=48).filter(lambda b: b[0] > 1))
        return [first]
    return draw(frame_lists())


@st.composite
def raw_tcp_payloads(draw: st.DrawFn) -> Frame:
    """Bytes for a raw TCP connection: not ZMTP, or ZMTP broken after a
    valid greeting."""
    kind = draw(st.integers(0, 5))
    tail = draw(st.one_of(st.binary(max_size=512), big_frames))
    if kind == 0:
        return tail
    greeting = zmtp_greeting(mechanism=draw(st.sampled_from([b"NULL", b"PLAIN", b"X"])))
    if kind == 1:
        return greeting + bytes(tail)
    socket_type = draw(
        st.sampled_from([b"DEALER", b"PUB", b"SUB", b"XSUB", b"PUSH", b"ROUTER", b"?"])
    )
    ready = zmtp_ready(socket_type)
    if kind == 2:
        return greeting + ready + bytes(tail)
    if kind == 3:  # a frame that claims to be huge
        size = draw(st.sampled_from([2**31, 2**40, 2**63 - 1, 2**64 - 1]))
        return greeting + ready + b"\x02" + struct.pack("!Q", size) + b"abc"
    if kind == 4:  # ZMTP 2.0, then garbage
        return b"\xff" + bytes(8) + b"\x7f\x01\x05" + bytes(tail)
    return b"\x01\x00" + bytes(tail)  # ZMTP 1.0: an anonymous identity


def zmtp_greeting(mechanism: bytes = b"NULL") -> bytes:
    """A ZMTP 3.0 greeting, as a client."""
    return (
        b"\xff" + bytes(8) + b"\x7f\x03\x00" + mechanism.ljust(20, b"\x00") + bytes(32)
    )


def zmtp_ready(socket_type: bytes) -> bytes:
    name = b"Socket-Type"
    body = b"\x05READY" + bytes([len(name)]) + name
    body += struct.pack("!I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def zmtp_message(frames: Sequence[bytes]) -> bytes:
    """A multipart message as ZMTP 3.0 frames."""
    out = []
    for index, frame in enumerate(frames):
        more = 1 if index < len(frames) - 1 else 0
        if len(frame) < 256:
            out.append(bytes([more, len(frame)]))
        else:
            out.append(bytes([more | 2]) + struct.pack("!Q", len(frame)))
        out.append(frame)
    return b"".join(out)


VALID_PROPERTIES = [
    b"",
    b"ttl=0\n",
    b"ttl=0.0\n",
    b"ttl=-0\n",
    b"ttl=86400\n",
    b"ttl=1e6\n",
    b"ttl= 1e7 \n",
    b"ttl=5\nttl=0\n",  # the last one counts
    b"ttl=nan\nttl=100000\n",
    b"owner=svc\n",
    b"lineage=not-ours\n",  # sequence 0: not a hand-over
    b"branch=7\nfresh=1\n",
    b"expired=3\n",
    b"last=9\ncount=2\n",
    b"age=1\n",
    "cl\u00e9=v\u00e0lue\n".encode(),
    b"a==b\n",
    b"x=1",
]


@dataclass(frozen=True)
class ValidWrite:
    key: bytes
    body: bytes
    properties: bytes
    sequence: int
    anonymous: bool


@st.composite
def valid_writes(draw: st.DrawFn) -> ValidWrite:
    """A write every server applies: odd properties, hand-over forms from
    another map, deletes, writes without a UUID."""
    properties = draw(st.sampled_from(VALID_PROPERTIES))
    sequence = 0
    form = draw(st.integers(0, 5))
    if form == 0:  # a sequence without a lineage: ignored
        sequence = draw(st.integers(1, 2**63 - 1))
    elif form == 1:  # a hand-over from another map, maybe a delete by expiry
        sequence = draw(st.integers(1, 2**40))
        properties += b"lineage=%s\n" % draw(foreign_lineages).encode()
        if draw(st.booleans()):
            properties += b"expired=%d\n" % draw(st.integers(0, 2**40))
    body = draw(
        st.one_of(
            st.just(b""),
            st.binary(min_size=1, max_size=64),
            st.binary(min_size=1, max_size=64).map(lambda b: b * 64),
        )
    )
    return ValidWrite(draw(valid_keys), body, properties, sequence, draw(st.booleans()))


# -- actions -------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One thing a stranger does: ``kind`` names the socket."""

    kind: str  # collector, snapshot, publisher, state, tcp, valid
    server: str  # primary, backup, both
    messages: tuple[tuple[Frame, ...], ...] = ()
    identity: bytes | None = None
    write: ValidWrite | None = None
    port: str = ""  # for tcp: snapshot, publisher, collector, state
    payload: Frame = b""

    def size(self) -> int:
        return sum(size_of(m) for m in self.messages) + len(self.payload)


servers = st.sampled_from(["primary", "backup"])


def messages_of(
    strategy: st.SearchStrategy[list[Frame]],
) -> st.SearchStrategy[tuple[tuple[Frame, ...], ...]]:
    return st.lists(strategy.map(tuple), min_size=1, max_size=4).map(tuple)


actions = st.one_of(
    st.builds(
        Action,
        st.just("collector"),
        st.sampled_from(["primary", "backup", "both"]),
        messages_of(collector_garbage()),
    ),
    st.builds(
        Action,
        st.just("snapshot"),
        servers,
        messages_of(snapshot_garbage()),
        identity=identities,
    ),
    st.builds(Action, st.just("publisher"), servers, messages_of(xsub_messages())),
    st.builds(Action, st.just("state"), servers, messages_of(xsub_messages())),
    st.builds(
        Action,
        st.just("tcp"),
        servers,
        port=st.sampled_from(["snapshot", "publisher", "collector", "state"]),
        payload=raw_tcp_payloads(),
    ),
    st.builds(Action, st.just("valid"), st.just("both"), write=valid_writes()),
)
#: An example: a few actions, at most 4 MB in all.
examples = st.lists(actions, min_size=1, max_size=6).filter(
    lambda acts: sum(a.size() for a in acts) <= 4 * 1_048_576
)


# -- the live pair ---------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def last_status(proc: ServerProcess) -> dict[str, object] | None:
    """The newest status line of ``proc``'s log, as a dict."""
    lines = [line for line in proc.log().splitlines() if " status {" in line]
    if not lines:
        return None
    status: dict[str, object] = ast.literal_eval(lines[-1].split(" status ", 1)[1])
    return status


class Heartbeats:
    """A SUB that hears a server's heartbeats, and the longest silence.

    ZeroMQ does not say when a message arrived, only that it was not there
    the last time the socket was found empty: the silence measured between
    two heartbeats is from the latest such time before the second to when
    the first was read, never more than the real one (so a test that was
    slow to read cannot fail this)."""

    def __init__(
        self, sock: zmq.Socket[bytes], accept: Callable[[Frames], bool]
    ) -> None:
        self.sock = sock
        self.accept = accept
        self.last = self.empty_at = time.monotonic()
        self.longest = 0.0
        self.heard: list[Frames] = []

    def receive(self, timeout: float) -> Frames | None:
        """The next message, or None after ``timeout`` seconds."""
        for _ in range(2):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self.empty_at = time.monotonic()
                if timeout <= 0 or not self.sock.poll(int(timeout * 1000)):
                    self.empty_at = time.monotonic()
                    return None
                timeout = 0
                continue
            if self.accept(frames):
                self.longest = max(self.longest, self.empty_at - self.last)
                self.last = time.monotonic()
                self.heard.append(frames)
                del self.heard[:-8]
            return frames
        return None

    def drain(self) -> None:
        for _ in range(100_000):
            if self.receive(0) is None:
                return

    def check(self, what: str) -> None:
        """Fail unless heard within ``HEARTBEAT_GAP`` (waiting that long)."""
        self.drain()
        deadline = self.last + HEARTBEAT_GAP
        for _ in range(100_000):
            if time.monotonic() - self.last < HEARTBEAT_GAP / 2:
                break
            if self.receive(deadline - time.monotonic()) is None:
                break
        silence = max(self.longest, self.empty_at - self.last)
        assert silence <= HEARTBEAT_GAP, (
            f"{what}: silent for {silence:.2f} s (at most {HEARTBEAT_GAP} s)"
        )


class Live:
    """The pair, a model of its map, and the sockets the checks use."""

    def __init__(
        self,
        pair: Pair,
        primary: ServerProcess,
        backup: ServerProcess,
        ctx: Context,
        data_home: Path,
    ) -> None:
        self.pair, self.ctx, self.data_home = pair, ctx, data_home
        self.procs = {"primary": primary, "backup": backup}
        self.ports = {"primary": pair.p1, "backup": pair.p2}
        self.state_ports = {"primary": pair.s1, "backup": pair.s2}
        #: What the valid writes made: the map, and its sequence.
        self.values: dict[bytes, bytes] = {}
        self.sequence = 0
        self.rss_start: dict[str, float] = {}
        self.rss_peak: dict[str, float] = {}
        self.examples = 0
        self.sent: dict[str, int] = {}
        self.started = time.monotonic()
        self._serial = itertools.count()
        #: One PUB per collector: everything sent to a server's collector
        #: goes through one pipe, in order, so a barrier comes after it.
        self.writers = {
            name: self.connect(zmq.PUB, port + 2, linger=0)
            for name, port in self.ports.items()
        }
        for writer in self.writers.values():
            writer.setsockopt(zmq.SNDHWM, 0)  # never drop (PUB drops at its HWM)
        self.dealers = {
            name: open_socket(ctx, zmq.DEALER, [port])
            for name, port in self.ports.items()
        }
        self.stream = Heartbeats(
            open_socket(ctx, zmq.SUB, [pair.p1 + 1], [HUGZ, b"/barrier"]),
            lambda frames: frames[0] == HUGZ,
        )
        self.states = {
            name: Heartbeats(open_socket(ctx, zmq.SUB, [port], [b""]), bool)
            for name, port in self.state_ports.items()
        }

    def connect(
        self,
        kind: int,
        port: int,
        *,
        linger: int = 1000,
        timeout: float = 2.0,
    ) -> zmq.Socket[bytes]:
        """A socket connected to ``port`` once its ZMTP handshake is done
        (an XSUB drops what it sends before that).  The caller closes it."""
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        try:
            sock.setsockopt(zmq.LINGER, linger)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            try:
                sock.connect(tcp(port))
                if not monitor.poll(int(timeout * 1000)):
                    raise TimeoutError(f"no ZMTP handshake with port {port}")
                recv_monitor_message(monitor)
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close(linger=0)

    # -- the map the valid writes made --

    def write(self, write: ValidWrite) -> bytes:
        """Send ``write`` to both collectors (a client writes to both); the
        model follows.  Its UUID, if it has one, is new."""
        uuid = b"" if write.anonymous else uuidlib.uuid4().bytes
        frames = [
            write.key,
            SEQUENCE.pack(write.sequence),
            uuid,
            write.properties,
            write.body,
        ]
        assert not collector_rejects(frames), frames
        for writer in self.writers.values():
            writer.send_multipart(frames)
        if write.body:
            self.values[write.key] = write.body
        else:
            self.values.pop(write.key, None)
        self.sequence += 1
        return uuid

    def barrier(self) -> None:
        """A write after everything sent so far: once the active published
        it, its collector took all that came before; its sequence says that
        nothing else took one."""
        body = b"barrier-%d" % next(self._serial)
        uuid = self.write(ValidWrite(b"/barrier", body, b"", 0, False))
        deadline = time.monotonic() + BARRIER_TIMEOUT
        for _ in range(1_000_000):
            frames = self.stream.receive(deadline - time.monotonic())
            assert frames is not None, (
                f"the active did not publish a write within {BARRIER_TIMEOUT} s"
            )
            if frames[0] == b"/barrier" and frames[2] == uuid:
                sequence = SEQUENCE.unpack(frames[1])[0]
                assert sequence == self.sequence, (
                    f"the barrier write got sequence {sequence}, not "
                    f"{self.sequence}: a rejected message took a sequence, or "
                    "a valid one did not"
                )
                return
        raise AssertionError("the barrier never came back")

    # -- checks --

    def check(self) -> None:
        for name, proc in self.procs.items():
            assert proc.alive, (
                f"the {name} exited ({proc.popen.returncode}):\n{proc.log()[-3000:]}"
            )
        self.barrier()
        snapshot = request_snapshot(self.ctx, self.ports["primary"], timeout=5.0)
        assert snapshot is not None, "the active did not answer a snapshot in 5 s"
        assert snapshot.values() == self.values, "the map is not what was written"
        assert snapshot.sequence == self.sequence
        self.stream.check("the active's HUGZ")
        for name, expected in (("primary", State.ACTIVE), ("backup", State.PASSIVE)):
            heartbeats = self.states[name]
            heartbeats.check(f"the {name}'s Binary Star heartbeat")
            states = {decode_state(frames) for frames in heartbeats.heard}
            assert states == {expected}, f"the {name} is {states}, not {expected}"
        for name, proc in self.procs.items():
            rss = rss_mb(proc.pid)
            self.rss_peak[name] = max(self.rss_peak.get(name, 0.0), rss)
            growth = rss - self.rss_start[name]
            assert growth <= RSS_GROWTH_MB, (
                f"the {name}'s memory grew by {growth:.0f} MB, from "
                f"{self.rss_start[name]:.0f} MB (at most {RSS_GROWTH_MB} MB)"
            )
        for dealer in self.dealers.values():  # replies to valid requests
            for _ in range(100_000):
                try:
                    dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break

    # -- sending --

    def run(self, example: Sequence[Action]) -> None:
        """Carry out an example's actions, then check."""
        strangers: list[zmq.Socket[bytes]] = []
        try:
            for action in example:
                where = f"{action.kind} {action.server}"
                self.sent[where] = self.sent.get(where, 0) + 1
                self._act(action, strangers)
        finally:
            for sock in strangers:
                sock.close(linger=1000)  # what is queued still goes out
        self.check()
        self.examples += 1

    def _act(self, action: Action, strangers: list[zmq.Socket[bytes]]) -> None:
        if action.kind == "valid":
            assert action.write is not None
            self.write(action.write)
            return
        both = ["primary", "backup"]
        messages = [materialize(m) for m in action.messages]
        for name in both if action.server == "both" else [action.server]:
            port = self.ports[name]
            if action.kind == "collector":
                for frames in messages:
                    assert collector_rejects(frames), frames
                    self.writers[name].send_multipart(frames)
            elif action.kind == "snapshot":
                dealer = self.dealers[name]
                if action.identity is not None:  # a stranger of its own
                    dealer = self.ctx.socket(zmq.DEALER)
                    strangers.append(dealer)
                    dealer.setsockopt(zmq.ROUTING_ID, action.identity)
                    dealer.connect(tcp(port))
                for frames in messages:
                    dealer.send_multipart(frames)
            elif action.kind in ("publisher", "state"):
                # An XSUB, spoken here: libzmq's own XSUB keeps what it
                # subscribes to in a trie that it frees recursively, and
                # a subscription of 1 MB overflows the stack of the test
                # process (the server's XPUB keeps them differently).
                target = port + 1 if action.kind == "publisher" else 0
                raw_xsub(target or self.state_ports[name], messages)
            elif action.kind == "tcp":
                where = {
                    "snapshot": port,
                    "publisher": port + 1,
                    "collector": port + 2,
                    "state": self.state_ports[name],
                }[action.port]
                raw_tcp(where, bytes(action.payload))
            else:
                raise AssertionError(action.kind)


def raw_tcp(port: int, payload: bytes, timeout: float = 2.0) -> None:
    """Connect, send ``payload`` (as much as the server takes), close once
    the server has (it drops a connection that breaks ZMTP)."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        _send_and_close(conn, payload, timeout)


def raw_xsub(port: int, messages: Sequence[Frames], timeout: float = 2.0) -> None:
    """Be an XSUB over TCP, speaking ZMTP here: send ``messages`` upstream,
    then close once the server has."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(zmtp_greeting() + zmtp_ready(b"XSUB"))
        # The server's greeting and READY (64 bytes, then a command of
        # 2 + n): libzmq 4.3.5 drops a peer whose first message comes in
        # one read with the end of its greeting, so wait for them first.
        heard, deadline = b"", time.monotonic() + timeout
        while len(heard) < 66 or len(heard) < 66 + heard[65]:
            assert time.monotonic() < deadline, "no ZMTP handshake"
            chunk = conn.recv(65536)
            assert chunk, f"the server closed the connection: {heard!r}"
            heard += chunk
        _send_and_close(conn, b"".join(map(zmtp_message, messages)), timeout)


def _send_and_close(conn: socket.socket, payload: bytes, timeout: float) -> None:
    with contextlib.suppress(OSError):  # the server may drop us midway
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and conn.recv(65536):
            pass  # what the server says, until it closes


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The pair, started once for the module, under a hard time limit."""
    logs = tmp_path_factory.mktemp("fuzz-logs")
    data_home = logs / "data"  # (Processes gives servers their data folders there)
    with contextlib.ExitStack() as stack:
        stack.enter_context(time_limit(TIME_LIMIT))
        # The servers' data folders are under the log folder (Processes'
        # XDG_DATA_HOME); see data_dir_digest.
        procs = stack.enter_context(Processes(logs))
        pair = Pair(procs, ("--status-interval", "1"))
        try:
            primary, backup = pair.start()
        finally:
            pair.close()  # its own sockets would subscribe to everything
        ctx: Context = zmq.Context()
        stack.callback(destroy, ctx)
        live = Live(pair, primary, backup, ctx, data_home)
        stack.callback(live.close)
        for name in ("primary", "backup"):
            _probe(live, name)
        snapshot = wait_snapshot(ctx, pair.p1)
        live.values, live.sequence = snapshot.values(), snapshot.sequence
        live.stream.check("the active's HUGZ")
        for name, proc in live.procs.items():
            live.rss_start[name] = rss_mb(proc.pid)
        yield live


def _probe(live: Live, name: str, timeout: float = 5.0) -> None:
    """Write through the collector PUB of ``name`` until a write is applied
    (the PUB drops what it sends before the SUB's subscription reached it).
    Anonymous writes: every one that arrives is applied, and the passive
    holds none; the model starts from a snapshot taken after this."""
    key = b"/probe/" + name.encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live.writers[name].send_multipart([key, bytes(8), b"", b"", b"probe"])
        time.sleep(0.05)
        if name == "primary":
            snapshot = request_snapshot(live.ctx, live.pair.p1, key)
            applied = snapshot is not None and key in snapshot.entries
        else:  # the passive counts the anonymous writes it cannot hold
            status = last_status(live.procs[name]) or {}
            applied = bool(status.get("anonymous_not_held"))
        if applied:
            time.sleep(0.2)  # a later attempt may still arrive
            return
    raise TimeoutError(f"no write through the collector of the {name} arrived")


# -- the tests -------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(
        [Phase.explicit, Phase.generate, Phase.shrink]
        if SHRINK
        else [Phase.explicit, Phase.generate]
    ),
    suppress_health_check=list(HealthCheck),
)
@given(example=examples)
def test_malformed_traffic_on_every_socket_changes_nothing(
    live: Live, example: list[Action]
) -> None:
    live.run(example)


def test_after_the_fuzz_the_logs_are_clean_and_the_passive_takes_over_the_map(
    live: Live,
) -> None:
    """Last in the module: it kills the primary."""
    digests = settled_digests(live)
    fixed_garbage_on_every_socket(live)
    after = {name: data_dir_digest(live.data_home, name) for name in live.procs}
    assert after == digests, "rejected input changed a data folder"
    live.check()

    for name, proc in live.procs.items():
        log = proc.log()
        assert "Traceback" not in log, f"the {name} logged a traceback"
        errors = [line for line in log.splitlines() if level_of(line) == "ERROR"]
        assert not errors, f"the {name} logged errors: {errors[:5]}"
        for where in ("collector", "snapshot", "publisher"):
            assert f"rejected on the {where} socket" in log, (
                f"the {name} logged no rejection on its {where} socket"
            )
        assert log.count("Binary Star: ") == 1, f"the {name} changed roles"

    # The passive holds the active's map, and no pending write: nothing
    # rejected went onto its pending list.
    assert live.procs["backup"].wait_for_status(
        5.0, state="PASSIVE", sequence=live.sequence, keys=len(live.values), pending=0
    ), f"the passive's last status: {last_status(live.procs['backup'])}"

    rejected = {
        name: (last_status(proc) or {}).get("rejected")
        for name, proc in live.procs.items()
    }
    live.pair.procs.kill(live.procs["primary"])
    snapshot, _, _ = vote_until_snapshot(live.ctx, live.ports["backup"], every=1.0)
    assert snapshot.values() == live.values, "the backup took over another map"
    assert snapshot.sequence == live.sequence
    assert live.procs["backup"].alive

    elapsed = time.monotonic() - live.started
    print(
        f"\nlive fuzz: {live.examples} examples, {elapsed:.1f} s; actions: "
        f"{dict(sorted(live.sent.items()))}; rejected: {rejected}; "
        "VmRSS MB (start -> peak): "
        + ", ".join(
            f"{name} {live.rss_start[name]:.0f} -> {live.rss_peak.get(name, 0):.0f}"
            for name in live.procs
        )
    )


def level_of(line: str) -> str:
    """The level of a log line: ``DATE TIME [name] LOGGER LEVEL message``."""
    parts = line.split(" ", 5)
    return parts[4] if len(parts) > 4 else ""


def fixed_garbage_on_every_socket(live: Live) -> None:
    """A malformed message on every socket of both servers (and a broken
    ZMTP connection to each port); then wait until each server counted the
    three it can reject (its status line)."""
    before = {name: _rejected(proc) for name, proc in live.procs.items()}
    for name, port in live.ports.items():
        live.writers[name].send_multipart([b"/k", bytes(7), b"", b"", b"v"])
        live.dealers[name].send_multipart([b"ICANHAZ", b""])
        for target, message in (
            (port + 1, b"\x02not a subscription"),
            (live.state_ports[name], b"\x02nothing reads this"),
        ):
            raw_xsub(target, [[message]])
        for target in (port, port + 1, port + 2, live.state_ports[name]):
            raw_tcp(target, zmtp_greeting() + b"garbage")
    for name, proc in live.procs.items():
        assert proc.wait_for_status(10.0, rejected=before[name] + 3), (
            f"the {name} did not count 3 more rejections: {last_status(proc)}"
        )


def _rejected(proc: ServerProcess, settle: float = 2.5) -> int:
    """The ``rejected`` counter, once two status lines agree on it."""
    previous: object = None
    deadline = time.monotonic() + 4 * settle
    while time.monotonic() < deadline:
        value = (last_status(proc) or {}).get("rejected", 0)
        if value == previous:
            assert isinstance(value, int)
            return value
        previous = value
        time.sleep(settle / 2)
    raise TimeoutError(f"the rejected counter of {proc.name} did not settle")
