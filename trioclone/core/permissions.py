"""Who may read and write which keys: a secured server's permissions.

A client is known by the NAME of its public certificate (``NAME.key`` in
the server's clients folder).  The permissions file (TOML) gives each
client the key prefixes it may read and write::

    [clients.deploy]
    read = [""]              # "" is every key
    write = ["config/", "services/"]

    [default]                # every client not named above
    read = ["public/"]
    write = []

Without a permissions file every allowed client reads and writes the
whole map.  With one, a client it does not name gets ``[default]``, and
without ``[default]`` it may read everything and write nothing.  The
servers of the pair (``PAIR``) may do anything.

Reading is checked on snapshot requests: the subtree asked for must lie
under a prefix the client may read.  Writing is checked on every KVSET
(a delete and a TTL are writes): its key must start with a prefix the
client may write.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from trioclone.errors import ConfigError

#: The User-Id of the pair's servers (the ZAP handler gives it to the key
#: pair they share); never a client's NAME, which cannot start with "@".
PAIR = "@pair"


@dataclass(frozen=True)
class Grant:
    """The key prefixes one client may read and write."""

    read: tuple[bytes, ...]
    write: tuple[bytes, ...]

    def may_write(self, key: bytes) -> bool:
        return key.startswith(self.write)

    def may_read(self, subtree: bytes) -> bool:
        """A snapshot of ``subtree`` (a prefix) shows only readable keys."""
        return subtree.startswith(self.read)


EVERYTHING = Grant((b"",), (b"",))
READ_ONLY = Grant((b"",), ())


@dataclass(frozen=True)
class Permissions:
    clients: Mapping[str, Grant]
    default: Grant

    def grant(self, user: str) -> Grant:
        if user == PAIR:
            return EVERYTHING
        return self.clients.get(user, self.default)


OPEN = Permissions({}, EVERYTHING)


def parse_permissions(text: str, source: str) -> Permissions:
    """The permissions in TOML ``text``; ``ConfigError`` naming ``source``
    and the entry at fault for anything else."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(document) - {"clients", "default"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown table {sorted(unknown)[0]!r} "
            "(expected [clients.NAME] and [default])"
        )
    default = (
        _grant(document["default"], f"{source} [default]")
        if "default" in document
        else READ_ONLY
    )
    clients = document.get("clients", {})
    if not isinstance(clients, dict):
        raise ConfigError(f"{source}: 'clients' must be tables [clients.NAME]")
    return Permissions(
        {
            name: _grant(entry, f"{source} [clients.{name}]")
            for name, entry in clients.items()
        },
        default,
    )


def _grant(entry: object, where: str) -> Grant:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table with 'read' and 'write'")
    unknown = set(entry) - {"read", "write"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    return Grant(
        _prefixes(entry.get("read", [""]), f"{where} read"),
        _prefixes(entry.get("write", []), f"{where} write"),
    )


def _prefixes(value: object, where: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: must be a list of key prefixes (strings)")
    return tuple(dict.fromkeys(p.encode() for p in value))  # each once, in order
