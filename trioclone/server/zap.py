"""The ZAP handler of a secured server: which keys may connect, and as whom.

libzmq asks the handler bound at ``ZAP_ENDPOINT`` in the socket's context
about every CURVE handshake (the ZeroMQ Authentication Protocol, RFC 27)
and waits for its answer, so it is bound before any of the server's
sockets.  It allows the pair's own key (as ``PAIR``) and the public key of
each certificate in the clients folder (as ``NAME/KEY``: the file's NAME
and the key in Z85, which libzmq then attaches to every message of that
connection as its User-Id); it denies every other key, counting and
logging each denial (rate-limited).

The folder and the permissions file are read again when they change
(looked at once a second): a key added is allowed from its next
connection; a key removed, or replaced by another under the same NAME,
may no longer write or take snapshots from then on (its connections
already open are not cut).  A certificate that cannot be used is logged
and left out (its key not allowed); a permissions file that cannot be
used is logged and the previous permissions are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import NoReturn

import trio
from zmq.utils import z85

from trioclone._log import Limited
from trioclone._zmq import Socket
from trioclone.core.permissions import (
    OPEN,
    PAIR,
    Grant,
    Permissions,
    parse_permissions as parse,
)
from trioclone.curve import PUBLIC_SUFFIX, KeyPair, read_public_folder
from trioclone.errors import ConfigError

log = logging.getLogger("trioclone.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
VERSION = b"1.0"
#: Seconds between looks at the clients folder and the permissions file.
RELOAD_INTERVAL = 1.0
NOTHING = Grant((), ())

Frames = list[bytes]


class ZapHandler:
    """Allows the pair's key and the clients folder's keys; grants each
    user its permissions."""

    def __init__(
        self,
        pair: KeyPair,
        clients: Path,
        permissions: Path | None,
        stats: MutableMapping[str, int],
    ) -> None:
        self._pair_key = z85.decode(pair.public)
        self._clients = clients
        self._permissions_path = permissions
        self._stats = stats
        self._log = Limited(log)
        self._stamp = self._stamps()
        self._checked = -float("inf")
        self.allowed: Mapping[bytes, str] = {}
        self.permissions = OPEN
        self._grants: dict[str, Grant] = {}
        #: User-Ids refused for the rest of this process (``ban``).
        self._banned: set[str] = set()
        self._use(*self._load())
        if not self.allowed:
            log.warning(
                "no client certificate (*%s) in %s: no client can connect",
                PUBLIC_SUFFIX,
                clients,
            )

    def grant(self, user: str) -> Grant:
        """What ``user`` (a message's User-Id) may read and write now:
        nothing if its key was removed or replaced since it connected."""
        return self._grants.get(user, NOTHING)

    def answer(self, frames: Frames, now: float) -> Frames | None:
        """The reply to one ZAP request (with its ROUTER envelope)."""
        self.reload(now)
        if len(frames) < 9 or frames[1] != b"" or frames[2] != VERSION:
            self._log.log(logging.ERROR, "zap", "a malformed ZAP request: %r", frames)
            if len(frames) >= 4:
                return [*frames[:4], b"500", b"malformed request", b"", b""]
            return None
        envelope, request_id = frames[:2], frames[3]
        address, mechanism, credentials = frames[5], frames[7], frames[8:]
        user = None
        if mechanism == b"CURVE" and len(credentials) == 1:
            user = self._user(credentials[0], now)
        if user is None:
            self._stats["auth_denied"] += 1
            shown = z85.encode(credentials[0]) if len(credentials) == 1 else b"?"
            self._log.log(
                logging.WARNING,
                "auth",
                "denied a %s connection from %s: key %s is not in %s",
                mechanism.decode(errors="replace"),
                address.decode(errors="replace"),
                shown.decode(),
                self._clients,
            )
            return [
                *envelope,
                VERSION,
                request_id,
                b"400",
                b"key not allowed",
                b"",
                b"",
            ]
        return [*envelope, VERSION, request_id, b"200", b"OK", user.encode(), b""]

    def _user(self, key: bytes, now: float) -> str | None:
        """Who ``key`` is; a key not known yet makes the handler look at the
        folder at once: libzmq does not always retry a connection it was
        refused (libzmq issue 3519), so a key just added must not be."""
        if key == self._pair_key:
            return PAIR
        if key not in self.allowed:
            self.reload(now, at_once=True)
        name = self.allowed.get(key)
        if name is None or user_id(name, key) in self._banned:
            return None
        return user_id(name, key)

    def ban(self, user: str) -> None:
        """Refuse ``user`` from now on, for the rest of this process: its
        new connections, and its writes, snapshots and status requests on
        the ones open (which libzmq cannot cut)."""
        if user == PAIR or user in self._banned:
            return
        self._banned.add(user)
        self._grants.pop(user, None)
        log.error(
            "banned client %r until this server restarts: it sent the update "
            "socket messages that are not subscriptions (remove its key from "
            "%s so it stays out)",
            client_name(user),
            self._clients,
        )

    async def run(self, sock: Socket) -> NoReturn:
        while True:
            batch: list[Frames] = []
            with trio.move_on_after(RELOAD_INTERVAL):
                batch = await sock.receive_batch(64)
            now = trio.current_time()
            self.reload(now)
            for frames in batch:
                try:
                    reply = self.answer(frames, now)
                except Exception:  # a bug here must not stop the server
                    log.exception("the ZAP handler failed; the connection is refused")
                    reply = [*frames[:4], b"500", b"internal error", b"", b""]
                if reply is not None:
                    await sock.send(reply)

    # -- the folder and the file, read again when they change ------------------

    def reload(self, now: float, *, at_once: bool = False) -> None:
        if now - self._checked < RELOAD_INTERVAL and not at_once:
            return
        self._checked = now
        stamp = self._stamps()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        problems: list[ConfigError] = []
        try:
            allowed, permissions = self._load(problems)
        except Exception as exc:  # the folder itself: the keys stay
            log.error("kept the previous client keys and permissions: %s", exc)
            return
        for problem in problems:  # (that file's key is not allowed meanwhile)
            log.error("left out until it is fixed: %s", problem)
        log.info(
            "read the client keys again: %d allowed (%s)",
            len(allowed),
            ", ".join(sorted(allowed.values())) or "none",
        )
        self._use(allowed, permissions)

    def _use(self, allowed: Mapping[bytes, str], permissions: Permissions) -> None:
        self.allowed, self.permissions = allowed, permissions
        self._grants = {
            user_id(name, key): permissions.grant(name) for key, name in allowed.items()
        }
        self._grants[PAIR] = permissions.grant(PAIR)
        for user in self._banned:
            self._grants.pop(user, None)

    def _load(
        self, problems: list[ConfigError] | None = None
    ) -> tuple[Mapping[bytes, str], Permissions]:
        """The keys and permissions; ``ConfigError`` for any file at fault,
        or, with ``problems`` (a reload), that file's error appended: a bad
        certificate is left out (its key is not allowed), a bad permissions
        file leaves the permissions as they were."""
        allowed = {
            z85.decode(public): name
            for public, name in read_public_folder(self._clients, problems).items()
        }
        path = self._permissions_path
        if path is None:
            return allowed, OPEN
        try:
            return allowed, parse(_text(path), str(path))
        except ConfigError as problem:
            if problems is None:
                raise
            problems.append(problem)
            return allowed, self.permissions

    def _stamps(self) -> tuple[object, ...]:
        """What changes when a key or the permissions change."""
        paths = [self._clients]
        with contextlib.suppress(OSError):
            paths += sorted(self._clients.glob(f"*{PUBLIC_SUFFIX}"))
        if self._permissions_path is not None:
            paths.append(self._permissions_path)
        return tuple(_stamp(path) for path in paths)


def _text(path: Path) -> str:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"the permissions file {path} is not a regular file")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the permissions file {path}: {exc}") from exc


def user_id(name: str, key: bytes) -> str:
    """The User-Id of a client's connections: its NAME and its key."""
    return f"{name}/{z85.encode(key).decode()}"


def client_name(user: str) -> str:
    """The NAME in a User-Id (what logs and refusals show)."""
    return user.partition("/")[0]


def _stamp(path: Path) -> object:
    try:
        status = os.stat(path)
    except OSError as exc:
        return (str(path), exc.errno)
    return (str(path), status.st_mtime_ns, status.st_size, status.st_ino)
