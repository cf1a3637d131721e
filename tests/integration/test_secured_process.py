"""A secured pair as real processes, keys made by ``trioclone keygen``.

The documented set-up (docs/security.md), end to end: one key pair for
the servers, one per client, the clients' public certificates in a
folder, a permissions file; every command a subprocess.  Real clock,
bounded waits; processes stopped by PID.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import HOST, Processes, free_base_ports, free_ports

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 30.0


def trioclone(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioclone", "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def test_a_secured_pair_from_the_command_line(tmp_path: Path) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    for name in ("pair", "deploy", "viewer", "mallory"):
        made = trioclone("keygen", name, "--dir", str(keys))
        assert made.returncode == 0, made.stderr
    assert (keys / "pair.key_secret").stat().st_mode & 0o777 == 0o600
    again = trioclone("keygen", "pair", "--dir", str(keys))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    for name in ("deploy", "viewer"):  # mallory's key is not given to the servers
        shutil.copy(keys / f"{name}.key", clients / f"{name}.key")
    permissions = tmp_path / "permissions.toml"
    permissions.write_text('[clients.deploy]\nwrite = ["config/"]\n')

    primary_port, backup_port = free_base_ports(2)
    primary_state, backup_state = free_ports(2)
    security = [
        "--curve-secret",
        str(keys / "pair.key_secret"),
        "--curve-clients",
        str(clients),
        "--permissions",
        str(permissions),
        "--in-memory",
        "--bind",
        HOST,
        "--peer",
        HOST,
    ]
    servers = [f"tcp://{HOST}:{primary_port}", f"tcp://{HOST}:{backup_port}"]

    def client(name: str) -> list[str]:
        chosen = [a for s in servers for a in ("--server", s)]
        if name == "plain":
            return chosen
        return [
            *chosen,
            "--server-key",
            str(keys / "pair.key"),
            "--client-key",
            str(keys / f"{name}.key_secret"),
        ]

    with Processes(tmp_path) as procs:
        for role, own, peer, state, peer_state in (
            ("primary", primary_port, backup_port, primary_state, backup_state),
            ("backup", backup_port, primary_port, backup_state, primary_state),
        ):
            procs.start(
                role,
                "--role",
                role,
                "--port",
                str(own),
                "--peer-port",
                str(peer),
                "--state-port",
                str(state),
                "--peer-state-port",
                str(peer_state),
                *security,
            )
        wrote = trioclone("set", "config/a", "1", "--timeout", "20", *client("deploy"))
        assert wrote.returncode == 0, (wrote.stderr, procs.started[0].log())
        read = trioclone("get", "config/a", *client("viewer"))
        assert (read.returncode, read.stdout.strip()) == (0, "1")

        refused = trioclone("set", "secret/a", "1", *client("deploy"))
        assert refused.returncode == 5
        assert "may not write 'secret/a'" in refused.stderr
        viewer = trioclone("set", "config/b", "1", *client("viewer"))
        assert viewer.returncode == 5 and "may write no key" in viewer.stderr

        for outsider in ("mallory", "plain"):
            shut_out = trioclone("get", "config/a", "--timeout", "2", *client(outsider))
            assert shut_out.returncode == 3, shut_out.stderr  # no server answered
        assert "denied a CURVE connection" in procs.started[0].log()

        dumped = trioclone("dump", *client("viewer"))
        assert dumped.stdout.split() == ["config/a=1"]

        half = trioclone("set", "config/b", "1", "--server-key", str(keys / "pair.key"))
        assert half.returncode == 2 and "go together" in half.stderr


def test_bad_security_options_are_refused_before_serving(tmp_path: Path) -> None:
    (port,) = free_base_ports()
    common = ["serve", "--standalone", "--port", str(port), "--in-memory"]
    lone = trioclone(*common, "--curve-secret", str(tmp_path / "x.key_secret"))
    assert lone.returncode == 2 and "go together" in lone.stderr
    (tmp_path / "clients").mkdir()
    missing = trioclone(
        *common,
        "--curve-secret",
        str(tmp_path / "none.key_secret"),
        "--curve-clients",
        str(tmp_path / "clients"),
    )
    assert missing.returncode == 2 and "none.key_secret" in missing.stderr
    made = trioclone("keygen", "pair", "--dir", str(tmp_path))
    assert made.returncode == 0
    bad = tmp_path / "permissions.toml"
    bad.write_text("[clients.x]\nwrite = 'config/'\n")
    refused = trioclone(
        *common,
        "--curve-secret",
        str(tmp_path / "pair.key_secret"),
        "--curve-clients",
        str(tmp_path / "clients"),
        "--permissions",
        str(bad),
    )
    assert refused.returncode == 2
    assert "[clients.x] write: must be a list" in refused.stderr
