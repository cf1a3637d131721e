"""The progress meter (trioclone/progress.py) with plain numbers: no I/O,
no clock but the times passed in."""

from __future__ import annotations

import pytest

from trioclone.progress import Meter, duration


def test_the_line_shows_count_total_rate_and_eta() -> None:
    meter = Meter("load", 100_000, start=10.0)
    meter.record(41_200, 13.0)
    assert meter.rate() == pytest.approx(41_200 / 3)
    assert meter.eta() == pytest.approx(58_800 / (41_200 / 3))
    assert meter.line() == "load: 41,200/100,000 keys  13,733 keys/s  ETA 4 s"


def test_without_a_total_there_is_no_eta() -> None:
    meter = Meter("dump (snapshot)", None, start=0.0)
    meter.record(5_000, 2.0)
    assert meter.eta() is None
    assert meter.line() == "dump (snapshot): 5,000 keys  2,500 keys/s"


def test_before_any_time_passed_there_is_no_rate_nor_eta() -> None:
    meter = Meter("load", 10, start=5.0)
    assert meter.line() == "load: 0/10 keys"
    meter.record(3, 5.0)
    assert meter.rate() is None and meter.eta() is None
    assert meter.line() == "load: 3/10 keys"


def test_no_eta_while_nothing_moves() -> None:
    meter = Meter("load", 10, start=0.0)
    meter.record(0, 3.0)
    assert meter.rate() == 0
    assert meter.eta() is None
    assert meter.line() == "load: 0/10 keys  0 keys/s"


def test_the_rate_is_over_the_recent_window_not_since_the_start() -> None:
    """The last 5 s by default (README)."""
    meter = Meter("load", 1_000_000, start=0.0)
    now, done = 0.0, 0
    for _ in range(50):  # 10 s at 1,000 keys/s
        now, done = now + 0.2, done + 200
        meter.record(done, now)
    assert meter.rate() == pytest.approx(1_000)
    for _ in range(50):  # then 10 s at 10,000 keys/s
        now, done = now + 0.2, done + 2_000
        meter.record(done, now)
    assert meter.rate() == pytest.approx(10_000)  # since start: 5,500
    assert meter.eta() == pytest.approx((1_000_000 - done) / 10_000)


def test_samples_are_kept_apart_however_often_it_is_told() -> None:
    """A count recorded per write keeps a few samples per window, not one
    per write; the rate is still exact."""
    meter = Meter("load", None, start=0.0, window=5.0, interval=0.2)
    for n in range(1, 100_001):
        meter.record(n, n / 10_000)  # 10,000 a second for 10 s
    assert len(meter._samples) <= 5.0 / 0.1 + 2
    assert meter.rate() == pytest.approx(10_000, rel=0.01)


def test_failures_are_shown() -> None:
    meter = Meter("load", 100, start=0.0)
    meter.record(40, 2.0, failed=3)
    assert meter.line() == "load: 40/100 keys  20 keys/s  ETA 3 s  3 failed"
    assert meter.summary() == "load: 40 keys in 2.0 s, 20 keys/s, 3 failed"


def test_a_count_past_an_estimated_total_drops_the_total_and_eta() -> None:
    meter = Meter("dump (snapshot)", 100, start=0.0)
    meter.record(120, 1.0)
    assert meter.eta() is None
    assert meter.line() == "dump (snapshot): 120 keys  120 keys/s"
    meter.record(100, 2.0)  # reached: no ETA either
    assert meter.eta() is None


def test_a_count_that_went_down_measures_the_rate_from_there() -> None:
    """A snapshot asked again (another server) counts from 0 again."""
    meter = Meter("dump (snapshot)", 1_000, start=0.0)
    meter.record(500, 1.0)
    meter.record(0, 1.5)
    assert meter.rate() is None
    meter.record(100, 2.0)
    assert meter.rate() == pytest.approx(200)


def test_the_summary_has_the_count_the_time_and_the_mean_rate() -> None:
    meter = Meter("dump", 2_000, start=1.0, unit="lines")
    meter.record(2_000, 2.6)
    assert meter.summary() == "dump: 2,000 lines in 1.6 s, 1,250 lines/s"


def test_a_redraw_waits_for_the_delay_then_the_interval() -> None:
    meter = Meter("load", 10, start=100.0, interval=0.2, delay=0.5)
    assert not meter.due(100.0)
    assert not meter.due(100.49)
    assert meter.due(100.5)
    assert not meter.shown
    meter.drawn(100.5)
    assert meter.shown
    assert not meter.due(100.6)
    assert meter.due(100.7)
    assert meter.due(100.5 + 0.1 + 0.1)  # (a sum of floats)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (0.2, "1 s"),
        (5, "5 s"),
        (5.4, "5 s"),
        (5.6, "6 s"),
        (59.5, "1 min 00 s"),
        (60, "1 min 00 s"),
        (125, "2 min 05 s"),
        (3_780, "1 h 03 min"),
        (-1, "0 s"),
    ],
)
def test_durations_are_to_the_nearest_second_and_never_0_above_0(
    seconds: float, text: str
) -> None:
    assert duration(seconds) == text
