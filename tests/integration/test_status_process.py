"""``trioclone status`` and the metrics endpoint against a real pair: two
``serve --role`` processes on 127.0.0.1 (stopped by PID), the CLI run as a
subprocess, the endpoint scraped with urllib.  Real clock, every wait
bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.procs import HOST, Pair, Processes, free_base_ports, free_ports

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 30.0


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioclone", "status", "--timeout", "2", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def servers(*ports: int) -> list[str]:
    return [arg for port in ports for arg in ("--server", f"tcp://{HOST}:{port}")]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text: str = r.read().decode()
        return text


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the scrape")


def test_status_and_metrics_of_a_running_pair(tmp_path: Path) -> None:
    (metrics_port,) = free_ports(1)
    (nobody,) = free_base_ports(1)
    with Processes(tmp_path) as procs, Pair(procs) as pair:
        primary = pair.start_primary("primary", "--metrics-port", str(metrics_port))
        backup = pair.start_backup()
        assert backup.wait_for_log("synced from the active", 15.0), backup.log()
        pair.probe(pair.sub_primary)
        keys = pair.write_until_seen(b"/s", 10, pair.sub_primary)

        # Both answer; the table has one row each and tells them apart.
        shown = status(*servers(pair.p1, pair.p2))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert len(lines) == 3
        assert lines[1].split()[1:3] == ["primary", "ACTIVE"]
        assert lines[2].split()[1:3] == ["backup", "PASSIVE"]

        as_json = status("--json", *servers(pair.p1, pair.p2))
        out = json.loads(as_json.stdout)
        assert out["actives"] == 1
        first, second = out["servers"]
        assert first["state"] == "ACTIVE" and second["state"] == "PASSIVE"
        assert first["keys"] == second["keys"] == len(keys) + 1  # and the probe
        assert first["lineage"] == second["lineage"] is not None
        assert second["synced"] is True

        # --check: exactly one active among those that answered.
        assert status("--check", *servers(pair.p1, pair.p2)).returncode == 0
        assert status("--check", *servers(pair.p2)).returncode == 1  # passive only
        assert status("--check", *servers(nobody)).returncode == 3
        unreachable = status("--check", *servers(pair.p1, nobody))
        assert unreachable.returncode == 0
        assert "unreachable" in unreachable.stdout.splitlines()[2]

        # The primary's metrics follow its writes.
        text = scrape(metrics_port)
        assert 'trioclone_state{state="ACTIVE"} 1.0' in text
        assert sample(text, "trioclone_keys") == len(keys) + 1
        before = sample(text, "trioclone_sequence")
        pair.write_until_seen(b"/more", 3, pair.sub_primary)
        deadline = time.monotonic() + 5.0
        while sample(scrape(metrics_port), "trioclone_sequence") < before + 3:
            assert time.monotonic() < deadline, "the sequence never moved"
            time.sleep(0.05)
        assert primary.alive and backup.alive
