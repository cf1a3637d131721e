"""A server's map on disk: one SQLite database (WAL mode) in its data folder.

What is kept: every key's record as the store packs it (sequence, UUID,
properties, value) with its TTL deadline as wall-clock time, so a restart
knows what expired while it was down; the window of replaced writes (a row
of UUIDs per commit, with the wall-clock time of its newest); and one meta
row: the map's lineage, sequence,
branch and history (``chp.map_of``), and whether this server was its
active (its own writes are then those after the branch).

When: the shell calls ``flush`` before anything that shows the map leaves
the server (every publish, every snapshot chunk) and after every input it
feeds the core.  Each call is one transaction holding whatever changed
since the last one (the journals of the maps, see store.py and applied.py):
a group commit, never one per update.  A map that cannot be written stops
the server (``DataDirError``): it must not publish what it cannot keep.

Two sets of tables: the map served (meta's ``current``) and the map a
passive's sync is building, written ahead as its snapshot arrives, so the
switch to it is one small transaction; the old set is emptied after.

``fsync`` (what a power cut can cost; a killed process costs nothing in
any mode, as every commit is in the operating system's hands first):

* ``always``: each commit waits for the disk: nothing published is lost.
* ``interval``: the log is synced to disk once a second (``sync``): a power
  cut loses at most the last second.
* ``off``: the operating system writes when it likes: a power cut may lose
  more, or leave a file that is refused as corrupt at the next start.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trioclone.core.applied import BUCKET, Applied
from trioclone.core.server import ServerCore, ServerMap
from trioclone.core.store import CorruptRecord
from trioclone.errors import CloneError
from trioclone.server.settings import FSYNC_MODES

FILE = "map.sqlite3"
UUID_SIZE = 16  # (chp.RULE_UUID: a UUID in a map is 16 bytes)
LOCK = "lock"
FORMAT = 1
FSYNC = dict(zip(FSYNC_MODES, ("FULL", "NORMAL", "OFF"), strict=True))
#: ``interval``: the log is synced this often.
SYNC_INTERVAL = 1.0

_SCHEMA = """
BEGIN;
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    format INTEGER NOT NULL,
    current INTEGER NOT NULL,
    lineage TEXT,
    sequence INTEGER NOT NULL,
    branch INTEGER NOT NULL,
    active INTEGER NOT NULL,
    history TEXT
);
INSERT INTO meta VALUES (0, {format}, 0, NULL, 0, 0, 0, NULL);
CREATE TABLE kv0 (key BLOB PRIMARY KEY, record BLOB NOT NULL, deadline REAL)
    WITHOUT ROWID;
CREATE TABLE kv1 (key BLOB PRIMARY KEY, record BLOB NOT NULL, deadline REAL)
    WITHOUT ROWID;
CREATE TABLE applied0 (at REAL NOT NULL, uuids BLOB NOT NULL);
CREATE TABLE applied1 (at REAL NOT NULL, uuids BLOB NOT NULL);
CREATE TABLE tombstones (
    key BLOB PRIMARY KEY,
    sequence INTEGER NOT NULL,
    uuid BLOB NOT NULL,
    expired INTEGER NOT NULL
) WITHOUT ROWID;
COMMIT;
"""


class DataDirError(CloneError):
    """The data folder cannot be used: it names the file and why."""


@dataclass(frozen=True)
class Kept:
    """What a start found on disk."""

    lineage: str
    sequence: int
    keys: int
    window: int
    active: bool


Meta = tuple[int, str | None, int, int, bool, str | None]


def wall_clock() -> float:
    """The wall clock, read by the shell only: a deadline or window time
    kept on disk must mean the same after a restart, when Trio's clock
    starts again from another origin."""
    return time.time()  # noqa: TID251


def default_folder(role: str, port: int) -> Path:
    """The per-user data folder of the server ``role`` on base port ``port``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "trioclone" / f"{role}-{port}"


class DataDir:
    """The durable copy of one server's map."""

    def __init__(self, folder: Path, fsync: str = "always", *, reset: bool = False):
        if fsync not in FSYNC:
            raise DataDirError(
                f"fsync must be one of {', '.join(FSYNC)}, not {fsync!r}"
            )
        self.folder = folder
        self.path = folder / FILE
        self.fsync = fsync
        self._lock_fd = self._lock(folder)
        try:
            if reset:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._current: int = self._db.execute("SELECT current FROM meta").fetchone()[0]
        self._cur_map: ServerMap | None = None
        self._next_map: ServerMap | None = None
        self._written: Meta | None = None
        self._dirty = False  # committed, not yet synced to disk (interval)
        self._evict_at = 0.0

    # -- opening ----------------------------------------------------------------

    def _lock(self, folder: Path) -> int:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot use the data folder {folder}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirError(
                f"the data folder {folder} is in use by another server "
                "(each server needs a folder of its own: --data-dir)"
            ) from None
        return fd

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"WAL mode refused ({mode})")
            db.execute(f"PRAGMA synchronous={FSYNC[self.fsync]}")
            tables = {
                row[0]
                for row in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                )
            }
            if not tables:
                db.executescript(_SCHEMA.format(format=FORMAT))
                return db
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            row = db.execute("SELECT format FROM meta").fetchone()
        except sqlite3.Error as exc:
            raise self._error("cannot be opened", exc) from exc
        if row is None or row[0] != FORMAT:
            raise DataDirError(
                f"{self.path} is not a trioclone map of format {FORMAT} "
                f"(found {row}); move it away or start with --reset-data"
            )
        return db

    def _error(self, what: str, exc: BaseException) -> DataDirError:
        return DataDirError(
            f"{self.path} {what}: {exc}; it is left as it is (move it away, or "
            "start with --reset-data to begin with an empty map)"
        )

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    # -- loading ------------------------------------------------------------------

    def load(self, core: ServerCore, now: float, wall: float) -> Kept | None:
        """Put the map kept on disk into ``core`` (None if there is none).

        ``now`` is the core's clock and ``wall`` the wall clock, read
        together: deadlines and window times are kept as wall-clock time."""
        try:
            meta = self._db.execute(
                "SELECT current, lineage, sequence, branch, active, history FROM meta"
            ).fetchone()
            current, lineage, sequence, branch, active, history = meta
            smap = core.map
            if lineage is not None:
                rows = self._db.execute(
                    f"SELECT key, record, deadline FROM kv{current}"
                )
                smap.store.load(_on_clock(rows, now, wall), sequence)
                _load_window(
                    smap.applied,
                    self._db.execute(
                        f"SELECT uuids, at FROM applied{current} ORDER BY rowid"
                    ),
                    now,
                    wall,
                )
        except (sqlite3.Error, CorruptRecord, ValueError, TypeError) as exc:
            raise self._error("is corrupt", exc) from exc
        self._cur_map, self._current = smap, current
        _clear_journals(smap)
        if lineage is None:
            return None
        try:
            tombstones = [
                (key, sequence, uuid, int(expired))
                for key, sequence, uuid, expired in self._db.execute(
                    "SELECT key, sequence, uuid, expired FROM tombstones"
                )
            ]
        except sqlite3.Error as exc:
            raise self._error("is corrupt", exc) from exc
        core.restore(lineage, branch, bool(active), history, tombstones)
        self._written = self._meta(core)
        return Kept(lineage, sequence, len(smap.store), len(smap.applied), bool(active))

    # -- writing --------------------------------------------------------------------

    def flush(self, core: ServerCore, now: float, wall: float) -> bool:
        """Commit what changed in ``core``'s maps since the last call; False
        if nothing had (no commit was made)."""
        smap, incoming = core.map, core.incoming
        meta = self._meta(core)
        if (
            smap is self._cur_map
            and incoming is None
            and meta == self._written
            and not smap.store.journal
            and not smap.applied.journal
            and not core.tombstones_changed
            and now < self._evict_at
        ):
            return False
        db, other = self._db, 1 - self._current
        try:
            db.execute("BEGIN")
            if smap is not self._cur_map:  # a sync went live (or a takeover)
                if smap is not self._next_map:
                    self._empty(other)
                self._write(other, smap, now, wall)
                self._current, self._cur_map, self._next_map = other, smap, None
                db.execute("DELETE FROM tombstones")  # the old map's deletes
                meta = self._meta(core)
                incoming = core.incoming
                stale = 1 - other
            else:
                self._write(self._current, smap, now, wall)
                stale = None
            self._write_tombstones(core)
            if incoming is not None:
                if incoming is not self._next_map:
                    self._empty(1 - self._current)
                    self._next_map = incoming
                self._write(1 - self._current, incoming, now, wall)
            if meta != self._written:
                db.execute(
                    "UPDATE meta SET current=?, lineage=?, sequence=?, branch=?, "
                    "active=?, history=?",
                    meta,
                )
            if now >= self._evict_at:
                self._evict_at = now + BUCKET
                self._evict(smap.applied, now, wall)
            db.execute("COMMIT")
            self._written = meta
            self._dirty = True
            if stale is not None and self._next_map is None:
                db.execute("BEGIN")
                self._empty(stale)
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise self._error("cannot be written", exc) from exc
        return True

    def sync(self) -> None:
        """``interval`` mode: put what was committed on the disk."""
        if self.fsync != "interval" or not self._dirty:
            return
        self._dirty = False
        wal = f"{self.path}-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._error("cannot be synced to disk", exc) from exc
        finally:
            os.close(fd)

    def _meta(self, core: ServerCore) -> Meta:
        return (
            self._current,
            core.lineage,
            core.map.store.sequence,
            core.branch,
            core.own_writes,
            core.map_history,
        )

    def _write(self, tables: int, smap: ServerMap, now: float, wall: float) -> None:
        store, applied = smap.store, smap.applied
        if store.journal:
            kept, gone = store.drain(wall - now)
            if gone:
                self._db.executemany(f"DELETE FROM kv{tables} WHERE key=?", gone)
            if kept:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO kv{tables} VALUES (?, ?, ?)", kept
                )
        added = applied.journal
        if added:  # one row: the newest time (each is remembered no shorter)
            applied.journal = []
            uuids = b"".join([uuid for uuid, _ in added])
            newest = max(when for _, when in added)  # (a loaded window is older)
            self._db.execute(
                f"INSERT INTO applied{tables} VALUES (?, ?)",
                (newest + wall - now, uuids),
            )

    def _write_tombstones(self, core: ServerCore) -> None:
        """The deletes the server made while active that a hand-over would
        carry (kept when it steps down, until its map is replaced)."""
        changed = core.tombstones_changed
        if not changed:
            return
        core.tombstones_changed = set()
        rows, gone = [], []
        for key in changed:
            tombstone = core.tombstone(key)
            if tombstone is None:
                gone.append((key,))
            else:
                rows.append((key, *tombstone))
        if gone:
            self._db.executemany("DELETE FROM tombstones WHERE key=?", gone)
        if rows:
            self._db.executemany(
                "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?)", rows
            )

    def _evict(self, applied: Applied, now: float, wall: float) -> None:
        """Forget, on disk too, the window's UUIDs it forgot."""
        oldest, table = applied.oldest, f"applied{self._current}"
        if oldest is None:
            self._db.execute(f"DELETE FROM {table}")
            return
        self._db.execute(
            f"DELETE FROM {table} WHERE rowid < (SELECT rowid FROM {table} "
            "WHERE at >= ? ORDER BY rowid LIMIT 1)",
            (oldest + wall - now - BUCKET,),
        )

    def _empty(self, tables: int) -> None:
        self._db.execute(f"DELETE FROM kv{tables}")
        self._db.execute(f"DELETE FROM applied{tables}")


def _on_clock(
    rows: Iterator[tuple[bytes, bytes, float | None]], now: float, wall: float
) -> Iterator[tuple[bytes, bytes, float | None]]:
    offset = now - wall
    for key, record, deadline in rows:
        yield key, record, None if deadline is None else deadline + offset


def _load_window(
    applied: Applied, rows: Iterator[tuple[bytes, float]], now: float, wall: float
) -> None:
    offset = now - wall
    for uuids, at in rows:
        if len(uuids) % UUID_SIZE:
            raise ValueError("a window row that is not whole UUIDs")
        when = min(at + offset, now)
        for start in range(0, len(uuids), UUID_SIZE):
            applied.add(uuids[start : start + UUID_SIZE], when)


def _clear_journals(smap: ServerMap) -> None:
    if smap.store.journal is not None:
        smap.store.journal = set()
    if smap.applied.journal is not None:
        smap.applied.journal = []
