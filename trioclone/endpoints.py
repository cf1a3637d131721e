"""A server's three CHP endpoints, and how users name a server."""

from __future__ import annotations

import re
from dataclasses import dataclass

from trioclone.errors import ConfigError

#: Reference defaults of the Guide's Model Six pair.
PRIMARY_PORT = 5556
BACKUP_PORT = 5566

_SERVER = re.compile(r"^(?:tcp://)?(?P<host>\[[^\]]+\]|[^:/\[\]]+)(?::(?P<port>\d+))?$")


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
        """``tcp://host:P``, ``host:P`` or ``host`` (P defaults to 5556)."""
        match = _SERVER.match(server.strip())
        if match is None:
            raise ConfigError(f"not a server address: {server!r} (try tcp://HOST:PORT)")
        port = int(match["port"]) if match["port"] else PRIMARY_PORT
        return cls.tcp(match["host"], port)

    def __str__(self) -> str:
        return self.snapshot


def check_port(port: int, span: int = 1) -> None:
    if not 1 <= port <= 65536 - span:
        raise ConfigError(f"port {port} is out of range (needs {span} from it)")
