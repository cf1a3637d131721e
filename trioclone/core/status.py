"""The status request: trioclone's own question on the snapshot socket.

A client sends one frame, ``STATUS?``, on a server's snapshot socket (port
P, where ICANHAZ goes); the server answers with two frames, ``STATUS`` and
a JSON object (UTF-8) of figures for operators.  The Guide's clients never
send it, so they never see the reply.  It is not a snapshot request, so it
is never a Binary Star vote, and every server answers it in every role.

Pure functions: decoders raise ``RemoteProtocolError`` naming the rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from trioclone.errors import RemoteProtocolError

STATUS_REQUEST = b"STATUS?"
STATUS_REPLY = b"STATUS"

RULE_STATUS_REQUEST = "a status request is exactly one frame, STATUS?"
RULE_STATUS_REPLY = "a status reply is two frames: STATUS and a JSON object"


def is_status_request(frames: Sequence[bytes]) -> bool:
    """Whether ``frames`` (a request, without the routing id) asks for the
    status: its first frame is ``STATUS?``."""
    return bool(frames) and frames[0] == STATUS_REQUEST


def check_status_request(frames: Sequence[bytes]) -> None:
    """A status request is well formed; ``RemoteProtocolError`` if not."""
    if len(frames) != 1 or frames[0] != STATUS_REQUEST:
        raise RemoteProtocolError(RULE_STATUS_REQUEST, f"got {len(frames)} frames")


def encode_status_request() -> list[bytes]:
    return [STATUS_REQUEST]


def encode_status_reply(status: Mapping[str, object]) -> list[bytes]:
    return [STATUS_REPLY, json.dumps(status, separators=(",", ":")).encode()]


def decode_status_reply(frames: Sequence[bytes]) -> dict[str, object]:
    """The figures of a status reply; ``RemoteProtocolError`` if malformed."""
    if len(frames) != 2 or frames[0] != STATUS_REPLY:
        raise RemoteProtocolError(
            RULE_STATUS_REPLY,
            f"got {len(frames)} frames, first {frames[0][:16]!r}"
            if frames
            else "got no frames",
        )
    try:
        status = json.loads(frames[1])
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(RULE_STATUS_REPLY, f"bad JSON: {exc}") from None
    if not isinstance(status, dict):
        raise RemoteProtocolError(RULE_STATUS_REPLY, "the JSON is not an object")
    return status
