"""How users name a server: ``Endpoints.parse`` and the port checks."""

from __future__ import annotations

import pytest

from trioclone.endpoints import Endpoints, check_port
from trioclone.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "snapshot"),
    [
        ("tcp://server.example:7000", "tcp://server.example:7000"),
        ("server.example:7000", "tcp://server.example:7000"),
        ("server.example", "tcp://server.example:5556"),
        ("  10.0.0.1:6000\n", "tcp://10.0.0.1:6000"),
        ("tcp://[::1]:5556", "tcp://[::1]:5556"),
        ("[::1]:5556", "tcp://[::1]:5556"),
        ("[::1]", "tcp://[::1]:5556"),
        ("tcp://[::1]", "tcp://[::1]:5556"),
        ("[fe80::1%eth0]:6000", "tcp://[fe80::1%eth0]:6000"),
        ("host:65533", "tcp://host:65533"),  # P+2 = 65535, the last port
    ],
)
def test_parse_accepts(text: str, snapshot: str) -> None:
    endpoints = Endpoints.parse(text)
    assert endpoints.snapshot == snapshot
    base = snapshot.rsplit(":", 1)[0]
    port = int(snapshot.rsplit(":", 1)[1])
    assert endpoints.publisher == f"{base}:{port + 1}"
    assert endpoints.collector == f"{base}:{port + 2}"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not a server address"),
        ("tcp://", "not a server address"),
        ("host:", "not a server address"),
        ("host:abc", "not a server address"),
        ("host:+5556", "not a server address"),
        ("host:\u0665\u0665\u0665\u0666", "not a server address"),  # Arabic digits
        ("tcp://host:5556/path", "not a server address"),
        ("udp://host:5556", "not a server address"),
        ("tcp://*:5556", "not a server address"),  # a bind address, not a server
        ("a host:5556", "not a server address"),
        ("user@host:5556", "not a server address"),
        ("host:5556:5557", "not a server address"),
        ("::1", "brackets"),
        ("tcp://::1:5556", "brackets"),
        ("[::1", "not a server address"),
        ("[::1]:", "not a server address"),
        ("[]:5556", "not a server address"),
        ("[not-ipv6]:5556", "IPv6"),
        ("[127.0.0.1]:5556", "IPv6"),
        ("host:0", "out of range"),
        ("host:65534", "out of range"),  # P+2 would be 65536
        ("[::1]:70000", "out of range"),
        ("host:1234567890", "not a server address"),
    ],
)
def test_parse_rejects(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        Endpoints.parse(text)


@pytest.mark.parametrize(
    ("port", "span", "ok"),
    [
        (1, 1, True),
        (65535, 1, True),
        (0, 1, False),
        (-1, 1, False),
        (65536, 1, False),
        (65533, 3, True),
        (65534, 3, False),
    ],
)
def test_check_port(port: int, span: int, ok: bool) -> None:
    if ok:
        check_port(port, span)
    else:
        with pytest.raises(ConfigError, match=f"port {port} is out of range"):
            check_port(port, span)
