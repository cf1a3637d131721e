"""The chaos tool (tools/chaos.py): a short run, and its checker's rules.

The run: a real pair SIGKILLed and restarted a few times (the active, the
passive, or both when the servers keep their maps on disk) under writer
and watcher processes; it must lose no confirmed write, every client's map
must equal the active's, no sequence may go back and nothing may crash.
"""

from __future__ import annotations

import importlib.util
import json
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


def _kept_run(folder: Path, handed_back: bool) -> None:
    """A run as ``--keep`` leaves it: the primary publishes k1 and k2 and is
    killed; the backup, which had heard only k1, takes over at 1; the
    primary's hand-over brings k2 back (or does not)."""
    lineage = "L" * 32
    seen = [
        ("primary", True, 0, 0, "", "", 1.0),
        ("primary", False, 1, None, "/k1", "w1-1", 1.1),
        ("primary", False, 2, None, "/k2", "w1-2", 1.2),
        ("primary", True, 2, 0, "", "", 1.5),
        ("backup", True, 1, None, "", "", 5.5),
        ("backup", True, 1, 1, "", "", 5.6),
    ]
    if handed_back:
        seen.append(("backup", False, 2, None, "/k2", "w1-2", 7.0))
    seen.append(("backup", True, 2 if handed_back else 1, 1, "", "", 7.5))
    with (folder / "observed.jsonl").open("w") as out:
        for server, hugz, seq, branch, key, value, t in seen:
            record = {"t": t, "server": server, "hugz": hugz, "seq": seq}
            if hugz:
                record |= {"lineage": lineage, "branch": branch}
            else:
                record |= {"key": key, "value": value}
            out.write(json.dumps(record) + "\n")
    writes = [
        {"key": "/k1", "value": "w1-1", "issued": 1.0, "seq": 1, "confirmed": 1.15},
        {"key": "/k2", "value": "w1-2", "issued": 1.15, "seq": 2, "confirmed": 1.25},
    ]
    (folder / "w1.jsonl").write_text(
        "".join(json.dumps(w | {"ended": w["confirmed"]}) + "\n" for w in writes)
    )
    final = {"/k1": [1, "w1-1"], **({"/k2": [2, "w1-2"]} if handed_back else {})}
    state = {
        "synced": True,
        "sequence": 2,
        "map": {k: v for k, (_, v) in final.items()},
    }
    (folder / "w1.state.json").write_text(json.dumps(state))
    args = {
        "seed": 1, "heartbeat": 0.5, "hugz": 0.5, "fsync": None,
        "modes": ["active"], "handover_grace": 5.0,
    }  # fmt: skip
    run = {
        "t0": 0.0,
        "wall": 10.0,
        "durable": True,
        "args": args,
        "servers": {
            "primary": {"starts": [0.0, 6.0], "ends": {"0": 5.0}},
            "backup": {"starts": [0.0], "ends": {}},
        },
        "clients": [{"name": "w1", "subtree": None}],
        "final": {
            "entries": final,
            "sequence": 2 if handed_back else 1,
            "lineage": lineage,
            "branch": 1,
        },
        "pair": ["backup", "primary"],
        "passive_status": {
            "lineage": lineage,
            "sequence": 2 if handed_back else 1,
            "keys": len(final),
        },
        "crashes": [],
        "unhealthy": [],
        "timeline": [],
        "modes": {"active": 1},
        "impatient": 0,
        "cycles_done": 1,
        "malformed": [],
    }
    (folder / "run.json").write_text(json.dumps(run))


@pytest.mark.parametrize("handed_back", [True, False])
def test_a_write_a_takeover_dropped_must_come_back(
    tmp_path: Path, handed_back: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    chaos = _tool()
    _kept_run(tmp_path, handed_back)
    status = chaos.Replay(tmp_path).report()
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    if handed_back:
        assert status == 0, out
        assert "lost 0, maps equal;" in last and "back later 1" in last, out
    else:
        assert status == 1, out
        assert "lost 1," in last, out
        assert "LOST: /k2 = w1-2 (seq 2," in out, out
