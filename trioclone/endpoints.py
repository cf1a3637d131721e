"""A server's three CHP endpoints, and how users name a server."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from trioclone.errors import ConfigError

#: Reference defaults of the Guide's Model Six pair.
PRIMARY_PORT = 5556
BACKUP_PORT = 5566

#: ``[tcp://]HOST[:PORT]``; HOST a name, an IPv4 address or ``[IPv6]``.
_SERVER = re.compile(
    r"(?:tcp://)?(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[A-Za-z0-9._-]+))"
    r"(?::(?P<port>[0-9]{1,9}))?",
    re.ASCII,
)


@dataclass(frozen=True)
class Endpoints:
    """Snapshot socket (P), publisher (P+1) and collector (P+2) of one server."""

    snapshot: str
    publisher: str
    collector: str

    @classmethod
    def tcp(cls, host: str, port: int) -> Endpoints:
        check_port(port, span=3)
        base = f"tcp://{host}:"
        return cls(f"{base}{port}", f"{base}{port + 1}", f"{base}{port + 2}")

    @classmethod
    def inproc(cls, name: str) -> Endpoints:
        base = f"inproc://{name}-"
        return cls(f"{base}snapshot", f"{base}publisher", f"{base}collector")

    @classmethod
    def parse(cls, server: str) -> Endpoints:
        """``tcp://host:P``, ``host:P`` or ``host`` (P defaults to 5556).

        An IPv6 address goes in brackets: ``tcp://[::1]:5556``, ``[::1]``.
        """
        match = _SERVER.fullmatch(server.strip())
        if match is None:
            hint = "try tcp://HOST:PORT"
            bare = server.strip().removeprefix("tcp://")
            if bare.count(":") >= 2 and "[" not in bare:
                hint = "an IPv6 address goes in brackets: tcp://[::1]:5556"
            raise ConfigError(f"not a server address: {server!r} ({hint})")
        host = match["host"]
        if host is None:
            try:
                ipaddress.IPv6Address(match["ipv6"])
            except ValueError:
                raise ConfigError(
                    f"not a server address: {server!r} "
                    "(brackets hold an IPv6 address, as in tcp://[::1]:5556)"
                ) from None
            host = f"[{match['ipv6']}]"
        port = int(match["port"]) if match["port"] else PRIMARY_PORT
        return cls.tcp(host, port)

    def __str__(self) -> str:
        return self.snapshot


def check_port(port: int, span: int = 1) -> None:
    """``port`` .. ``port + span - 1`` are all valid TCP ports (1-65535)."""
    if not 1 <= port <= 65536 - span:
        if span == 1:
            raise ConfigError(f"port {port} is out of range 1-65535")
        raise ConfigError(
            f"port {port} is out of range: a base port P needs P to P+{span - 1} "
            f"within 1-65535, so at most {65536 - span}"
        )
