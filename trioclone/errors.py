"""The exceptions trioclone raises.

``CloneError`` is the root.  A ``LocalProtocolError`` is our own misuse of the
protocol (a bug in the caller); a ``RemoteProtocolError`` is a peer that sent
something CHP does not allow.  The latter names the rule that was broken, so a
log line says *why* a message was rejected.
"""

from __future__ import annotations

from typing import TypeVar


class CloneError(Exception):
    """Base class of every error trioclone raises on purpose."""


class ProtocolError(CloneError):
    """Something broke a rule of the Clustered Hashmap Protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something CHP does not allow."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something CHP does not allow.

    ``rule`` is the rule, worded as in the spec ("a kvmsg has exactly 5
    frames"); ``str(error)`` adds what was actually seen.
    """

    def __init__(self, rule: str, detail: str = "") -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"{rule} ({detail})" if detail else rule)


class ConfigError(CloneError):
    """A setting is invalid (bad endpoint, port out of range, bad timing)."""


class NoServerError(CloneError):
    """No server answered within the time the caller allowed."""


class WriteTimeoutError(CloneError):
    """A write was not confirmed by the active server in time.

    The write may still have been applied (its confirmation may have been
    lost in a failover); the client stops resending it.
    """


class ClientClosedError(CloneError):
    """The client was used after it was closed."""


class PermissionDeniedError(CloneError):
    """A secured server refused a write or a snapshot: the client's key may
    not write that key, or read that subtree (see core/permissions.py)."""


E = TypeVar("E", bound=BaseException)


def leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions in ``group`` and the groups nested in it (a task's
    error reaches here inside its nursery's group)."""
    found: list[E] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
