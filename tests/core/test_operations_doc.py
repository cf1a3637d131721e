"""What docs/operations.md states about ports, timings, stopping and the
systemd unit, checked against the code (and the unit against the parser)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from trioclone.cli import VARIABLES, Supervisor, build_parser, setting_parsers
from trioclone.config import resolve
from trioclone.endpoints import Endpoints
from trioclone.server import clone
from trioclone.server.clone import CloneServer
from trioclone.server.settings import pair_settings

DOC = Path(__file__).parent.parent.parent / "docs" / "operations.md"


def unit() -> dict[str, str]:
    """The systemd unit in the guide, as ``Key: value`` (last one wins)."""
    text = DOC.read_text()
    block = re.search(r"```ini\n(.*?)```", text, re.S)
    assert block, "no unit in docs/operations.md"
    settings = {}
    for line in block[1].splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_each_server_reaches_its_peer_at_the_documented_ports() -> None:
    for role, own, peer, own_state, peer_state in (
        ("primary", 5556, 5566, 5003, 5004),
        ("backup", 5566, 5556, 5004, 5003),
    ):
        settings = pair_settings(role, bind_host="10.0.0.1", peer_host="hostB")
        assert settings.bind == Endpoints.tcp("10.0.0.1", own)
        pair = settings.pair
        assert pair is not None
        assert pair.state_bind == f"tcp://10.0.0.1:{own_state}"
        # connects to the peer's P, P+1, P+2 and its Binary Star port only
        assert pair.peer == Endpoints(
            f"tcp://hostB:{peer}", f"tcp://hostB:{peer + 1}", f"tcp://hostB:{peer + 2}"
        )
        assert pair.state_peer == f"tcp://hostB:{peer_state}"


def test_the_documented_timings_and_bounds_are_the_codes() -> None:
    options = build_parser().parse_args(["serve", "--role", "backup"])
    assert (options.heartbeat, options.peer_expiry) == (1.0, 2.0)
    assert (options.hugz, options.sync_timeout) == (1.0, 5.0)
    server = CloneServer(pair_settings("backup", hugz_interval=0.5))
    assert server.core.replica_timings.silence_timeout == 2 * 0.5 + 1.0
    assert server.core.replica_timings.request_timeout == 5.0
    assert (clone.STOP_LIMIT, clone.STOP_LINGER) == (3.0, 1.0)
    assert Supervisor({}).grace == 5.0 > clone.STOP_LIMIT


def test_the_systemd_unit_runs_a_valid_serve_command_and_waits_out_the_stop() -> None:
    settings = unit()
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["Restart"] == "on-failure"
    assert float(settings["TimeoutStopSec"]) > clone.STOP_LIMIT + 2
    assert settings["StateDirectory"] == "trioclone/%i"
    text = DOC.read_text()
    env_file = re.search(r"# /etc/trioclone/primary.env\n(.*?)```", text, re.S)
    assert env_file, "no environment file in docs/operations.md"
    environ = dict(line.split("=", 1) for line in env_file[1].split())
    assert environ == {"TRIOCLONE_BIND": "10.0.0.1", "TRIOCLONE_PEER": "10.0.0.2"}
    for role in ("primary", "backup"):
        program, *args = shlex.split(settings["ExecStart"].replace("%i", role))
        assert program.endswith("/trioclone")
        options = build_parser().parse_args(args)
        resolve(build_parser, setting_parsers, args, options, environ, VARIABLES)
        assert (options.role, options.peer, options.bind) == (
            role,
            "10.0.0.2",
            "10.0.0.1",
        )
        # its data folder is the one StateDirectory makes
        assert str(options.data_dir) == f"/var/lib/trioclone/{role}"
