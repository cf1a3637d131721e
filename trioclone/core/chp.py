"""The Clustered Hashmap Protocol (ZeroMQ RFC 12) on the wire.

A kvmsg is five frames: key, sequence (8 bytes, big-endian signed), UUID
(empty or 16 bytes), properties (``name=value\\n`` lines) and body (empty body
means delete).  The snapshot request is two frames: ``ICANHAZ?`` and a
subtree prefix.  ``KTHXBAI`` and ``HUGZ`` are kvmsgs with reserved keys.

Decoders validate everything and raise ``RemoteProtocolError`` naming the
broken rule; encoders raise ``LocalProtocolError``.  Both are pure functions.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from trioclone.errors import LocalProtocolError, RemoteProtocolError

ICANHAZ = b"ICANHAZ?"
KTHXBAI = b"KTHXBAI"
HUGZ = b"HUGZ"
TTL = "ttl"

# trioclone's additions, all where the Guide's clients and servers ignore them:
#: On HUGZ and KTHXBAI: the identity of the map the sequence belongs to.
LINEAGE = "lineage"
#: On HUGZ, with ``LINEAGE``: the claim a server makes when two are active.
BRANCH = "branch"
FRESH = "fresh"
#: A subtree heartbeat's key is the subtree followed by this marker; its
#: sequence is 0 (every client drops it as old) and its ``LAST`` property is
#: the sequence of the last update published under the subtree.
SUBTREE_HUGZ = b"\x00HUGZ"
LAST = "last"
#: On a subtree heartbeat: how many updates were published under the
#: subtree since its server began tracking it (so a client that applied
#: fewer between two heartbeats missed some, even if it has the last one).
COUNT = "count"
#: Keys no client may write: these, and every key ending in ``SUBTREE_HUGZ``.
#: A snapshot request for this "subtree" asks a trioclone server for the
#: UUIDs it applied recently (its repeat window); each reply carries a batch
#: of 16-byte UUIDs in the body and their ``AGE`` in seconds.  A Guide server
#: holds no such keys and answers with KTHXBAI alone.
HISTORY = b"\x00history"
#: Keys no client may write.
RESERVED = frozenset((HUGZ, KTHXBAI, HISTORY))
AGE = "age"

SEQUENCE = struct.Struct("!q")
NO_PROPERTIES: Mapping[str, str] = MappingProxyType({})

RULE_FRAMES = "a kvmsg has exactly 5 frames"
RULE_KEY = "a key is not empty"
RULE_SEQUENCE = "the sequence frame is exactly 8 bytes"
RULE_UUID = "the uuid frame is empty or exactly 16 bytes"
RULE_PROPERTY = "a property line is name=value"
RULE_PROPERTY_TEXT = "properties are UTF-8 text"
RULE_TTL_NUMBER = "ttl is a number of seconds"
RULE_TTL_FINITE = "ttl is a finite number"
RULE_TTL_SIGN = "ttl is not negative"
RULE_HISTORY = "a history batch is whole 16-byte UUIDs with a finite age"
RULE_COMMAND = "the only snapshot command is ICANHAZ?"
RULE_ICANHAZ_FRAMES = "ICANHAZ has exactly 2 frames"


class KVMsg(NamedTuple):
    """One key-value message, as it travels on every CHP socket.

    A named tuple: immutable, and four times cheaper to build than a frozen
    dataclass, which matters on the server's update path.
    """

    key: bytes
    sequence: int = 0
    uuid: bytes = b""
    properties: Mapping[str, str] = NO_PROPERTIES
    body: bytes = b""

    @property
    def ttl(self) -> float | None:
        """Seconds to live, or None; ``ttl=0`` means no expiry (as the Guide)."""
        return ttl_seconds(self.properties)


def decode_kvmsg(frames: Sequence[bytes]) -> KVMsg:
    """Decode and validate five frames; raise ``RemoteProtocolError``."""
    if len(frames) != 5:
        raise RemoteProtocolError(RULE_FRAMES, f"got {len(frames)}")
    key, sequence, uuid, properties, body = frames
    if not key:
        raise RemoteProtocolError(RULE_KEY)
    if len(sequence) != 8:
        raise RemoteProtocolError(RULE_SEQUENCE, f"got {len(sequence)} bytes")
    if len(uuid) not in (0, 16):
        raise RemoteProtocolError(RULE_UUID, f"got {len(uuid)} bytes")
    props = decode_properties(properties) if properties else NO_PROPERTIES
    if TTL in props:
        ttl_seconds(props)
    return KVMsg(key, SEQUENCE.unpack(sequence)[0], uuid, props, body)


def encode_kvmsg(msg: KVMsg) -> list[bytes]:
    """The five frames of ``msg``; raise ``LocalProtocolError`` if invalid."""
    if not msg.key:
        raise LocalProtocolError(RULE_KEY)
    if len(msg.uuid) not in (0, 16):
        raise LocalProtocolError(RULE_UUID, f"got {len(msg.uuid)} bytes")
    try:
        sequence = SEQUENCE.pack(msg.sequence)
    except struct.error as exc:
        raise LocalProtocolError("a sequence fits in 64 signed bits") from exc
    props = encode_properties(msg.properties)
    return [msg.key, sequence, msg.uuid, props, msg.body]


def decode_properties(frame: bytes) -> dict[str, str]:
    """Parse ``name=value`` lines, splitting each at its first ``=``."""
    try:
        text = frame.decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(RULE_PROPERTY_TEXT) from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the usual trailing newline; a missing one is tolerated
    props: dict[str, str] = {}
    for line in lines:
        name, equals, value = line.partition("=")
        if not equals or not name:
            raise RemoteProtocolError(RULE_PROPERTY, f"line {line[:40]!r}")
        props[name] = value
    return props


def encode_properties(props: Mapping[str, str]) -> bytes:
    """Serialise properties as ``name=value\\n`` lines."""
    lines = []
    for name, value in props.items():
        if not name or "=" in name or "\n" in name or "\n" in value:
            raise LocalProtocolError(RULE_PROPERTY, f"property {name!r}")
        lines.append(f"{name}={value}\n")
    try:
        return "".join(lines).encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(RULE_PROPERTY_TEXT) from exc


def ttl_seconds(props: Mapping[str, str]) -> float | None:
    """The ``ttl`` property in seconds, None when absent or zero."""
    text = props.get(TTL)
    if text is None:
        return None
    try:
        ttl = float(text)
    except ValueError as exc:
        raise RemoteProtocolError(RULE_TTL_NUMBER, f"got {text[:40]!r}") from exc
    if not math.isfinite(ttl):
        raise RemoteProtocolError(RULE_TTL_FINITE, f"got {text[:40]!r}")
    if ttl < 0:
        raise RemoteProtocolError(RULE_TTL_SIGN, f"got {text[:40]!r}")
    return ttl or None


def with_ttl(props: Mapping[str, str], ttl: float | None) -> dict[str, str]:
    """A copy of ``props`` with ``ttl`` set to ``ttl`` seconds (or removed)."""
    updated = dict(props)
    if ttl is None:
        updated.pop(TTL, None)
    else:
        updated[TTL] = format_ttl(ttl)
    return updated


#: The shortest TTL a writer may ask for: ``format_ttl`` writes six decimals,
#: so a shorter one would go out as ``ttl=0.000000``, read as "never".
MIN_TTL = 0.001


def format_ttl(ttl: float) -> str:
    """Seconds as the shortest text that both reference parsers accept."""
    return str(int(ttl)) if ttl == int(ttl) else f"{ttl:.6f}"


def decode_request(frames: Sequence[bytes]) -> bytes:
    """Validate a snapshot request; return its subtree prefix."""
    if frames and frames[0] != ICANHAZ:
        raise RemoteProtocolError(RULE_COMMAND, f"got {frames[0][:16]!r}")
    if len(frames) != 2:
        raise RemoteProtocolError(RULE_ICANHAZ_FRAMES, f"got {len(frames)}")
    return frames[1]


def encode_request(subtree: bytes = b"") -> list[bytes]:
    return [ICANHAZ, subtree]


def kthxbai(
    sequence: int, subtree: bytes, properties: Mapping[str, str] = NO_PROPERTIES
) -> list[bytes]:
    """End of a snapshot: the server's sequence, the subtree in the body."""
    props = encode_properties(properties) if properties else b""
    return [KTHXBAI, SEQUENCE.pack(sequence), b"", props, subtree]


def hugz(sequence: int, properties: Mapping[str, str] = NO_PROPERTIES) -> list[bytes]:
    """A heartbeat; carries the current sequence, as the reference servers do."""
    props = encode_properties(properties) if properties else b""
    return [HUGZ, SEQUENCE.pack(sequence), b"", props, b""]


def subtree_hugz(subtree: bytes, last: int, count: int | None = None) -> list[bytes]:
    """A subtree heartbeat: ``last`` is the newest sequence published under
    it, ``count`` how many updates were (``COUNT``)."""
    props = b"last=%d\n" % last
    if count is not None:
        props += b"count=%d\n" % count
    return [subtree + SUBTREE_HUGZ, SEQUENCE.pack(0), b"", props, b""]


def is_subtree_hugz(key: bytes) -> bool:
    return key.endswith(SUBTREE_HUGZ)


def is_reserved(key: bytes) -> bool:
    """Keys no client may write: the commands, and subtree heartbeats."""
    return key in RESERVED or key.endswith(SUBTREE_HUGZ)


def lineage_of(msg: KVMsg) -> str | None:
    """The map identity a HUGZ or KTHXBAI carries (None from a Guide server)."""
    return msg.properties.get(LINEAGE) or None


def map_of(msg: KVMsg) -> str | None:
    """Which history a HUGZ or KTHXBAI speaks for: the lineage, and in a pair
    the ``branch`` its server's active period started from.  Two servers of a
    split publish one lineage from one branch point on; the loser, once it
    resynced from the winner and takes over again later, serves another
    history under the same lineage, from another branch."""
    lineage = lineage_of(msg)
    branch = msg.properties.get(BRANCH)
    return lineage if lineage is None or branch is None else f"{lineage}/{branch}"


def integer_property(msg: KVMsg, name: str) -> int | None:
    """A property holding a non-negative integer of at most 18 ASCII digits;
    None if absent or anything else."""
    text = msg.properties.get(name)
    if text is None or not (0 < len(text) <= 18 and text.isascii() and text.isdigit()):
        return None
    return int(text)


def history_batch(uuids: Sequence[bytes], age: float) -> list[bytes]:
    """One message of a HISTORY reply: UUIDs applied ``age`` seconds ago."""
    props = encode_properties({AGE: format_ttl(max(age, 0.0))})
    return [HISTORY, SEQUENCE.pack(0), b"", props, b"".join(uuids)]


def check_history(msg: KVMsg) -> float:
    """The age of a HISTORY batch; ``RemoteProtocolError`` if the batch is bad.
    O(1): the UUIDs are not cut out."""
    try:
        age = float(msg.properties.get(AGE, ""))
    except ValueError:
        raise RemoteProtocolError(RULE_HISTORY, "no age") from None
    size = len(msg.body)
    if size % 16 or not math.isfinite(age) or age < 0:
        raise RemoteProtocolError(RULE_HISTORY, f"{size} bytes, age {age}")
    return age


def decode_history(msg: KVMsg) -> tuple[list[bytes], float]:
    """The UUIDs and age of a HISTORY batch; ``RemoteProtocolError`` if bad."""
    age, body = check_history(msg), msg.body
    return [body[i : i + 16] for i in range(0, len(body), 16)], age


#: A secured trioclone server's refusal, on the snapshot socket: four
#: frames (a kvmsg has five, so a reply is never mistaken for one):
#: ``KVDENIED``, the refused write's UUID (empty for a refused snapshot),
#: its key (or the subtree asked for), and the reason as UTF-8 text.
#: Only a client that was refused gets one; the Guide's clients never do.
DENIED = b"KVDENIED"


class Denial(NamedTuple):
    uuid: bytes
    key: bytes
    reason: str


def encode_denial(uuid: bytes, key: bytes, reason: str) -> list[bytes]:
    return [DENIED, uuid, key, reason.encode()]


def decode_denial(frames: Sequence[bytes]) -> Denial | None:
    """The denial ``frames`` are, or None if they are not one."""
    if len(frames) != 4 or frames[0] != DENIED:
        return None
    return Denial(frames[1], frames[2], frames[3].decode(errors="replace"))
