"""A real ``trioclone serve`` configured by the environment and a file.

One server process on 127.0.0.1, its settings from ``TRIOCLONE_*``
variables and a ``--config`` TOML file only, logging JSON lines; stopped by
SIGTERM (and by PID at the end, by the ``procs`` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import HOST, Processes, free_base_ports

TIME_LIMIT = 60


@pytest.mark.slow
def test_serve_takes_its_settings_from_env_and_file(
    procs: Processes, tmp_path: Path
) -> None:
    port, decoy = free_base_ports(2)
    config = tmp_path / "serve.toml"
    config.write_text(
        f'bind = "{HOST}"\nport = {decoy}\nin-memory = true\nstatus-interval = 0.2\n'
    )
    env = {
        "TRIOCLONE_STANDALONE": "true",
        "TRIOCLONE_PORT": str(port),  # beats the file's
        "TRIOCLONE_LOG_FORMAT": "json",
        "TRIOCLONE_CONFIG": str(config),
    }
    command = [sys.executable, "-m", "trioclone", "serve"]
    server = procs.run("configured", command, port=port, extra_env=env)
    assert server.wait_for_log('"status {', 15), server.log()
    put = subprocess.run(
        [*command[:3], "set", "/config/k", "v", "--server", f"tcp://{HOST}:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRIOCLONE_")},
    )
    assert put.returncode == 0, put.stderr + server.log()
    assert server.wait_for_log("'sequence': 1, 'keys': 1,", 10), server.log()
    os.kill(server.pid, signal.SIGTERM)
    assert server.popen.wait(timeout=10) == 0, server.log()
    lines = [json.loads(line) for line in server.log().splitlines()]
    messages = [line["message"] for line in lines]
    assert f"standalone listening: tcp://{HOST}:{port}" in " ".join(messages)
    assert "stopping on SIGTERM" in messages
    for line in lines:
        assert line["server"] == "standalone"
        assert line["time"].endswith("Z") and line["time"][10] == "T"
        assert line["level"] in ("INFO", "WARNING")
        assert line["logger"].startswith("trioclone")
