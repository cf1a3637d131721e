"""The chaos tool (tools/chaos.py): a short run, and its checker's rules.

The run: a real pair SIGKILLed and restarted a few times (the active, the
passive, or both when the servers keep their maps on disk) under writer
and watcher processes; it must lose no confirmed write, every client's map
must equal the active's, no sequence may go back and nothing may crash.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "chaos.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--cycles",
            "5",
            "--seed",
            "1",
            "--max-run",
            "1.5",
            "--max-down",
            "1.5",
            "--workdir",
            str(tmp_path / "chaos"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    lines = run.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    assert last.startswith("cycles 5, confirmed "), last
    assert ", lost 0, maps equal;" in last, last


def test_a_held_write_supersedes_a_confirmed_one_only_if_it_may_follow_it() -> None:
    chaos = _tool()

    def write(issued: float, confirmed: float | None, ended: float) -> object:
        return chaos.Write("w1", "/k", f"v{issued}", issued, 1, confirmed, ended)

    w = write(10.0, 10.1, 10.1)
    assert chaos.may_follow(write(11.0, 11.1, 11.1), w)  # issued later
    assert chaos.may_follow(write(9.9, 10.05, 10.05), w)  # overlapping
    assert not chaos.may_follow(write(9.0, 9.5, 9.5), w)  # confirmed before
    assert chaos.may_follow(write(5.0, None, 8.5), w)  # given up 1.5 s before
    assert not chaos.may_follow(write(5.0, None, 7.5), w)  # 2.5 s before


def test_the_checker_tells_a_sequence_that_went_back_from_a_takeover() -> None:
    chaos = _tool()
    Seen = chaos.Seen

    def hugz(t: float, server: str, seq: int, branch: int | None) -> object:
        return Seen(t, server, True, seq, "L", branch)

    def update(t: float, server: str, seq: int) -> object:
        return Seen(t, server, False, seq, key="/k", value=f"v{seq}")

    starts = {"primary": [0.0], "backup": [0.0]}
    takeover = [
        hugz(1.0, "primary", 0, 0),
        update(1.1, "primary", 1),
        update(1.2, "primary", 2),
        hugz(1.5, "primary", 2, 0),
        # the backup had heard 1 only: its takeover rewinds to 1
        hugz(3.0, "backup", 1, None),
        update(3.1, "backup", 2),
        hugz(3.5, "backup", 2, 1),
    ]
    histories, violations = chaos.split_histories(takeover, starts)
    assert violations == []
    assert [(h.server, h.branch, [u.seq for u in h.updates]) for h in histories] == [
        ("primary", 0, [1, 2]),
        ("backup", 1, [2]),
    ]
    went_back = [*takeover[:4], update(1.6, "primary", 1), hugz(2.0, "primary", 2, 0)]
    _, violations = chaos.split_histories(went_back, starts)
    assert len(violations) == 1 and "went back" in violations[0], violations
