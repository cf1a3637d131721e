"""The console under load, measured in a real Chromium: 10,000 keys and 500
updates a second to random keys, while the page shows 500 of them.

The page marks on ``<body data-seq>`` the client sequence of the last batch
it applied; the test reads that every 50 ms, then how many updates the
writer has sent: each is one sequence once the active applies it, so the
gap is how far the page trails the writes (the servers' part included), in
updates and in seconds.  It asserts only that the page keeps
up (it never trails by more than a second's updates, and shows the last one
within two seconds of the writes stopping, with every shown row right);
``nox -s console`` runs it longer and at more rates and keeps the figures
(``TRIOCLONE_CONSOLE_REPORT``, ``_SECONDS``, ``_RATES``).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.browser.conftest import start_console
from tests.browser.test_console_browser import cli, open_page, wait
from tests.integration.procs import (
    HOST,
    SEQUENCE,
    Pair,
    Processes,
    kvset,
    request_snapshot,
)

pytestmark = pytest.mark.slow
TIME_LIMIT = 300
KEYS = 10_000
SECONDS = float(os.environ.get("TRIOCLONE_CONSOLE_SECONDS", "10"))
RATES = [int(r) for r in os.environ.get("TRIOCLONE_CONSOLE_RATES", "500").split(",")]


def write_paced(
    pair: Pair, rate: int, seconds: float, stop: threading.Event, sent_so_far: list[int]
) -> int:
    """``rate`` updates a second to random keys of the map, for ``seconds``
    (``sent_so_far[0]``: how many are out, for the sampler)."""
    pick = random.Random(rate)
    start, sent = time.monotonic(), 0
    total = int(rate * seconds)
    while sent < total and not stop.is_set():
        due = start + sent / rate
        if (ahead := due - time.monotonic()) > 0:
            time.sleep(ahead)  # pacing a load generator, not waiting for a state
        key = b"/load/k%05d" % pick.randrange(KEYS)
        pair.writer.send_multipart(kvset(key, b"v%d" % sent))
        sent += 1
        sent_so_far[0] = sent
    return sent


def published(sub: zmq.Socket[bytes], last: int) -> int:
    """The highest sequence the active published so far (drains ``sub``)."""
    while sub.poll(0):
        frames = sub.recv_multipart()
        if len(frames) == 5 and frames[0] != b"HUGZ":
            last = max(last, SEQUENCE.unpack(frames[1])[0])
    return last


@pytest.mark.parametrize("rate", RATES)
def test_the_page_keeps_up_with_10000_keys_and_500_updates_a_second(
    browser: Any, procs: Processes, tmp_path: Path, rate: int
) -> None:
    with Pair(procs) as pair:
        pair.start()
        servers = [f"tcp://{HOST}:{pair.p1}", f"tcp://{HOST}:{pair.p2}"]
        dump = tmp_path / "map.json"
        dump.write_text(json.dumps({f"/load/k{n:05d}": f"v{n}" for n in range(KEYS)}))
        loaded = cli("load", str(dump), "--quiet", servers=servers)
        assert loaded.returncode == 0, loaded.stderr
        _console, url = start_console(procs, servers)

        began = time.monotonic()
        open_page(browser, url, "/load/")
        wait(
            browser,
            lambda d: len(d.find_elements("css selector", "tbody tr")) == 500,
            10,
            "the page never listed 500 of the 10,000 keys",
        )
        first_paint = time.monotonic() - began
        assert "showing 500 of 10000 keys" in browser.find_element("id", "more").text
        pair.probe(pair.sub_primary)  # the writer is connected: nothing is lost
        published(pair.sub_primary, 0)  # (drained)
        held = request_snapshot(pair.ctx, pair.p1)
        assert held is not None
        last = start = held.sequence  # no writes but the test's from here

        stop = threading.Event()
        result: list[int] = []
        sent_so_far = [0]
        writer = threading.Thread(
            target=lambda: result.append(
                write_paced(pair, rate, SECONDS, stop, sent_so_far)
            )
        )
        lags: list[int] = []
        writer.start()
        try:
            while writer.is_alive():
                last = published(pair.sub_primary, last)
                page = int(browser.execute_script("return document.body.dataset.seq"))
                # the writes out by now: each is one sequence, once applied
                lags.append(max(start + sent_so_far[0] - page, 0))
                time.sleep(0.05)  # the sampling period
        finally:
            stop.set()
            writer.join()
        ended = time.monotonic()
        # every write is to a key the map holds, so each is one sequence more
        final = start + result[0]
        deadline = ended + 10
        while time.monotonic() < deadline:
            last = published(pair.sub_primary, last)
            page = int(browser.execute_script("return document.body.dataset.seq"))
            if page >= final:
                break
            time.sleep(0.01)
        caught_up = time.monotonic() - ended
        sent = result[0]

        # every row the page shows holds the value the servers hold
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('tbody tr'),"
            " tr => [tr.dataset.key, tr.cells[1].textContent]);"
        )
        got = cli("dump", "/load/", "--json", servers=servers)
        held = json.loads(got.stdout)
        wrong = [(k, v, held.get(k)) for k, v in shown if held.get(k) != v]
        applied = int(browser.execute_script("return document.body.dataset.applied"))

    lags.sort()
    figures = {
        "keys": KEYS,
        "rate_offered": rate,
        "seconds": SECONDS,
        "updates_sent": sent,
        "rows_applied_by_page": applied,
        "first_listing_s": round(first_paint, 3),
        "lag_updates_p50": lags[len(lags) // 2],
        "lag_updates_p99": lags[int(len(lags) * 0.99)],
        "lag_updates_max": lags[-1],
        "lag_seconds_p99": round(lags[int(len(lags) * 0.99)] / rate, 3),
        "lag_seconds_mean": round(statistics.fmean(lags) / rate, 3),
        "caught_up_after_s": round(caught_up, 3),
        "samples": len(lags),
    }
    print(json.dumps(figures))
    report = os.environ.get("TRIOCLONE_CONSOLE_REPORT")
    if report:
        path = Path(report)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*runs, figures], indent=1) + "\n")
    assert sent == int(rate * SECONDS)
    assert last == start + sent, "the servers published other than the writes"
    assert not wrong, f"{len(wrong)} rows differ from the servers, e.g. {wrong[:3]}"
    assert lags[-1] <= rate, f"the page trailed by {lags[-1]} updates (over 1 s)"
    assert caught_up < 2.0, f"the page showed the last update only {caught_up:.2f} s on"
