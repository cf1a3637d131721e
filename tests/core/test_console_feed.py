"""The console's batches of changes (``trioclone.console.feed.Feed``): pure.

Time is passed in as plain numbers; ``lookup`` is the client's map, here a
dict of entries the test changes as the events say.
"""

from __future__ import annotations

from trioclone.client.events import DeleteEvent, ResyncEvent, SetEvent
from trioclone.console.feed import BATCH_LIMIT, HISTORY, Feed
from trioclone.core.client import Entry

T0 = 1000.0


class Map:
    """A client's entries, and the events their changes make."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.sequence = 0

    def lookup(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> SetEvent:
        self.sequence += 1
        properties = {} if ttl is None else {"ttl": f"{ttl:g}"}
        self.entries[key] = Entry(value, self.sequence, b"u" * 16, properties)
        return SetEvent(key, value, self.sequence)

    def delete(self, key: str) -> DeleteEvent:
        self.sequence += 1
        del self.entries[key]
        return DeleteEvent(key, self.sequence)


def test_a_key_changed_many_times_in_a_tick_is_sent_once_with_its_last_value() -> None:
    feed, clone = Feed(T0), Map()
    for i in range(50):
        feed.note(clone.set("hot", f"v{i}".encode()), T0, clone.lookup)
    feed.note(clone.set("cold", b"c"), T0, clone.lookup)
    rows, reload = feed.take(T0 + 0.1, clone.lookup)
    assert not reload
    assert rows == [
        {"k": "hot", "s": 50, "n": 3, "v": "v49", "e": "text"},
        {"k": "cold", "s": 51, "n": 1, "v": "c", "e": "text"},
    ]
    assert feed.updates == 51


def test_a_take_sends_only_what_changed_since_the_last() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("a", b"1"), T0, clone.lookup)
    assert [r["k"] for r in feed.take(T0, clone.lookup)[0]] == ["a"]
    assert feed.take(T0 + 0.1, clone.lookup) == ([], False)
    feed.note(clone.set("b", b"2"), T0, clone.lookup)
    assert [r["k"] for r in feed.take(T0 + 0.2, clone.lookup)[0]] == ["b"]


def test_a_deleted_key_is_sent_as_deleted_at_the_deletes_sequence() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("gone", b"x"), T0, clone.lookup)
    feed.note(clone.delete("gone"), T0, clone.lookup)
    assert feed.take(T0, clone.lookup) == ([{"k": "gone", "s": 2, "d": 1}], False)


def test_a_key_deleted_then_set_again_in_a_tick_is_sent_with_its_new_value() -> None:
    feed, clone = Feed(T0), Map()
    clone.set("k", b"old")
    feed.note(clone.delete("k"), T0, clone.lookup)
    feed.note(clone.set("k", b"new"), T0, clone.lookup)
    rows, _ = feed.take(T0, clone.lookup)
    assert rows == [{"k": "k", "s": 3, "n": 3, "v": "new", "e": "text"}]


def test_a_resync_tells_pages_to_reload_once() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("a", b"1"), T0, clone.lookup)
    clone.set("b", b"2")
    feed.note(ResyncEvent("tcp://x:1", {"b": b"2"}), T0, clone.lookup)
    assert feed.take(T0, clone.lookup) == ([], True)
    assert feed.take(T0 + 0.1, clone.lookup) == ([], False)
    assert feed.updates == 1  # a resync is not an update


def test_more_changes_than_the_batch_limit_make_a_reload() -> None:
    feed, clone = Feed(T0), Map()
    for i in range(BATCH_LIMIT + 1):
        feed.note(clone.set(f"k{i}", b"v"), T0, clone.lookup)
    assert feed.take(T0, clone.lookup) == ([], True)
    assert feed.take(T0, clone.lookup) == ([], False)


def test_changes_up_to_the_batch_limit_are_sent_as_rows() -> None:
    feed, clone = Feed(T0), Map()
    for i in range(BATCH_LIMIT):
        feed.note(clone.set(f"k{i}", b"v"), T0, clone.lookup)
    rows, reload = feed.take(T0, clone.lookup)
    assert not reload
    assert len(rows) == BATCH_LIMIT


# -- TTL deadlines -----------------------------------------------------------


def test_the_ttl_deadline_is_pinned_when_the_value_arrives() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("t", b"v", ttl=10), T0, clone.lookup)
    entry = clone.entries["t"]
    # listed 4 s later: 6 s left, not the ttl property's 10
    assert feed.ttl_left("t", entry, T0 + 4) == 6.0
    assert feed.ttl_left("t", entry, T0 + 9.5) == 0.5
    assert feed.ttl_left("t", entry, T0 + 30) == 0.0
    rows, _ = feed.take(T0 + 3, clone.lookup)
    assert rows[0]["t"] == 7.0


def test_a_new_value_pins_a_new_deadline() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("t", b"v", ttl=10), T0, clone.lookup)
    feed.note(clone.set("t", b"w", ttl=10), T0 + 5, clone.lookup)
    assert feed.ttl_left("t", clone.entries["t"], T0 + 6) == 9.0


def test_a_value_without_ttl_drops_the_deadline() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("t", b"v", ttl=10), T0, clone.lookup)
    feed.note(clone.set("t", b"w"), T0 + 1, clone.lookup)
    assert feed.ttl_left("t", clone.entries["t"], T0 + 2) is None
    rows, _ = feed.take(T0 + 2, clone.lookup)
    assert "t" not in rows[0]


def test_a_value_never_seen_arrive_is_pinned_when_first_listed() -> None:
    feed, clone = Feed(T0), Map()
    clone.set("t", b"v", ttl=10)
    entry = clone.entries["t"]
    assert feed.ttl_left("t", entry, T0 + 3) == 10.0
    assert feed.ttl_left("t", entry, T0 + 5) == 8.0


def test_a_resync_pins_the_values_it_brought() -> None:
    feed, clone = Feed(T0), Map()
    clone.set("t", b"v", ttl=4)  # a snapshot's ttl: the time it has left
    feed.note(ResyncEvent("tcp://x:1", {"t": b"v"}), T0, clone.lookup)
    assert feed.ttl_left("t", clone.entries["t"], T0 + 1) == 3.0


def test_a_deleted_value_forgets_its_deadline() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("t", b"v", ttl=10), T0, clone.lookup)
    feed.note(clone.delete("t"), T0 + 1, clone.lookup)
    clone.sequence = 0  # the same sequence again, e.g. from a new map
    feed.note(clone.set("t", b"v", ttl=10), T0 + 5, clone.lookup)
    assert clone.entries["t"].sequence == 1
    assert feed.ttl_left("t", clone.entries["t"], T0 + 6) == 9.0


# -- rates -------------------------------------------------------------------


def test_rates_count_the_updates_of_each_whole_second() -> None:
    feed, clone = Feed(T0), Map()
    assert feed.rates(T0) == [0] * HISTORY
    for t in (T0, T0 + 0.5, T0 + 0.99, T0 + 1.2):
        feed.note(clone.set("k", b"v"), t, clone.lookup)
    # the second in progress is not shown: T0's three are
    assert feed.rates(T0 + 1.5) == [0] * (HISTORY - 1) + [3]
    assert feed.rates(T0 + 2.0) == [0] * (HISTORY - 2) + [3, 1]


def test_rates_show_quiet_seconds_as_zeros() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("k", b"v"), T0, clone.lookup)
    feed.note(clone.set("k", b"v"), T0 + 4.5, clone.lookup)
    feed.note(clone.set("k", b"v"), T0 + 4.6, clone.lookup)
    assert feed.rates(T0 + 5) == [0] * (HISTORY - 5) + [1, 0, 0, 0, 2]


def test_rates_keep_the_last_history_seconds() -> None:
    feed, clone = Feed(T0), Map()
    for second in range(HISTORY + 10):
        for _ in range(second):
            feed.note(clone.set("k", b"v"), T0 + second, clone.lookup)
    rates = feed.rates(T0 + HISTORY + 10)
    assert len(rates) == HISTORY
    assert rates == list(range(10, HISTORY + 10))


def test_rates_after_a_long_quiet_spell_are_all_zero() -> None:
    feed, clone = Feed(T0), Map()
    feed.note(clone.set("k", b"v"), T0, clone.lookup)
    assert feed.rates(T0 + 10 * HISTORY) == [0] * HISTORY
    feed.note(clone.set("k", b"v"), T0 + 10 * HISTORY, clone.lookup)
    assert feed.rates(T0 + 10 * HISTORY + 1) == [0] * (HISTORY - 1) + [1]
    assert feed.updates == 2
