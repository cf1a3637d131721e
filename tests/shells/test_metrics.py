"""The Prometheus endpoint of an in-process server, scraped over HTTP on
127.0.0.1 (the server's own sockets are inproc://).  Real clock (the
endpoint's socket is a real one): no sleeps, every wait bounded."""

from __future__ import annotations

import socket
import sys

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.chp import RawClient, settle, unique
from tests.integration.procs import free_base_ports
from trioclone import cli
from trioclone._zmq import Sockets
from trioclone.core.chp import ICANHAZ
from trioclone.endpoints import Endpoints
from trioclone.errors import ConfigError
from trioclone.server import metrics
from trioclone.server.clone import CloneServer
from trioclone.server.settings import ServerSettings

GUARD = 20.0


async def http(address: tuple[str, int], request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request``; the status code, head and body of the answer."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


async def scrape(address: tuple[str, int]) -> dict[str, float]:
    """Every sample of ``GET /metrics``, by name and labels."""
    code, head, body = await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200, body
    assert b"Content-Type: text/plain" in head
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = (
                sample.value
            )
    return samples


def served(context, tmp_path, **options):
    settings = ServerSettings(
        Endpoints.inproc(unique("metrics")),
        metrics_port=0,
        data_dir=str(tmp_path / "map"),
        **options,
    )
    return settings, CloneServer(settings, context=context)


async def test_metrics_are_scraped_and_follow_the_writes(context, tmp_path):
    settings, server = served(context, tmp_path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert server.metrics is not None and server.metrics.address is not None
            address = server.metrics.address
            assert address[0] == "127.0.0.1"
            before = await scrape(address)
            assert before["trioclone_state{state=ACTIVE}"] == 1.0
            assert before["trioclone_state{state=PASSIVE}"] == 0.0
            assert before["trioclone_role{role=active}"] == 1.0
            assert before["trioclone_sequence"] == 0.0
            assert before["trioclone_keys"] == 0.0
            assert before["trioclone_pending"] == 0.0
            assert before["trioclone_uptime_seconds"] >= 0.0
            assert "trioclone_peer_heartbeat_age_seconds" not in before  # no peer
            assert before["trioclone_server_info{name=clone,version=0.1.0}"] == 1.0
            commits = before["trioclone_commit_duration_seconds_count"]
            with Sockets(context) as sockets:
                writer = RawClient(sockets, settings.bind)
                await settle()
                for i in range(5):
                    writer.set(b"/k/%d" % i, b"v")
                writer.set(b"HUGZ", b"not a key a client may write")
                writer.pub.try_send([b"one frame"])
                await writer.updates(5)
                reader = RawClient(sockets, settings.bind)
                await settle()
                await reader.snapshot()
                await reader.dealer.send([ICANHAZ, b"x", b"y"])  # broken
                await reader.dealer.send([b"STATUS?"])
                await reader.dealer.receive()  # (so the broken one was read)
                after = await scrape(address)
            assert after["trioclone_sequence"] == 5.0
            assert after["trioclone_keys"] == 5.0
            assert after["trioclone_updates_total"] == 5.0
            assert after["trioclone_published_total"] >= 5.0
            assert after["trioclone_snapshots_served_total"] == 1.0
            assert after["trioclone_snapshot_duration_seconds_count"] == 1.0
            assert after["trioclone_commit_duration_seconds_count"] > commits
            assert after["trioclone_status_requests_total"] == 1.0
            assert after["trioclone_rejected_total"] == 3.0
            rejected = {k: v for k, v in after.items() if "rejected_messages" in k}
            assert sum(rejected.values()) == 3.0
            assert any("socket=collector" in k for k in rejected)
            assert any("socket=snapshot" in k for k in rejected)
            assert "process_cpu_seconds_total" in after
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics/../x HTTP/1.1\r\n\r\n", 404),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests_get_an_error_and_the_server_goes_on(
    context, tmp_path, request_bytes, code
):
    _, server = served(context, tmp_path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert server.metrics is not None and server.metrics.address is not None
            got, head, _ = await http(server.metrics.address, request_bytes)
            assert got == code
            if code == 405:
                assert b"Allow: GET, HEAD" in head
            assert server.metrics.refused == 1
            assert (await scrape(server.metrics.address))["trioclone_keys"] == 0.0
            nursery.cancel_scope.cancel()


async def test_a_silent_scraper_is_cut_off(context, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.2)
    _, server = served(context, tmp_path)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert server.metrics is not None and server.metrics.address is not None
            stream = await trio.open_tcp_stream(*server.metrics.address)
            async with stream:
                await stream.send_all(b"GET /metr")  # and nothing more
                assert await stream.receive_some(100) == b""  # closed on us
            assert server.metrics.refused == 1
            head_only = await http(
                server.metrics.address, b"HEAD /metrics HTTP/1.0\r\n\r\n"
            )
            assert head_only[0] == 200 and head_only[2] == b""
            nursery.cancel_scope.cancel()


def test_without_prometheus_client_the_server_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"pip install 'trioclone\[metrics\]'"):
        metrics.require_prometheus()
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--standalone", "--in-memory", "--metrics-port", "9999"])
    assert info.value.code == 2
    assert "pip install 'trioclone[metrics]'" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "65536", "x"])
def test_a_bad_metrics_port_is_refused_at_start(port, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--standalone", "--in-memory", "--metrics-port", port])
    assert info.value.code == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_settings_refuse_a_metrics_port_out_of_range():
    with pytest.raises(ConfigError, match="metrics_port"):
        ServerSettings(Endpoints.inproc("x"), metrics_port=70000)


def test_a_local_pair_gives_each_server_its_own_metrics_port():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["serve", "--pair", "--metrics-port", "9100", "--metrics-bind", "0.0.0.0"]
    )
    commands = cli.local_pair_commands(args)
    children = {role: parser.parse_args(c[3:]) for role, c in commands.items()}
    assert children["primary"].metrics_port == 9100
    assert children["backup"].metrics_port == 9101
    assert {c.metrics_bind for c in children.values()} == {"0.0.0.0"}
    plain = cli.local_pair_commands(parser.parse_args(["serve", "--pair"]))
    for command in plain.values():
        child = parser.parse_args(command[3:])
        assert child.metrics_port is None and child.metrics_bind == "127.0.0.1"
    with pytest.raises(ConfigError, match="65534"):
        cli.local_pair_commands(
            parser.parse_args(["serve", "--pair", "--metrics-port", "65535"])
        )


def test_a_metrics_port_in_use_stops_the_server_with_a_clear_error(caplog):
    (base,) = free_base_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(
            [
                *("serve", "--standalone", "--in-memory", "--bind", "127.0.0.1"),
                *("--port", str(base), "--metrics-port", str(port)),
            ]
        )
    assert code == 1
    assert any(
        "cannot start the standalone server's metrics endpoint" in r.getMessage()
        and str(port) in r.getMessage()
        for r in caplog.records
    )
