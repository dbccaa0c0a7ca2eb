"""The embedded job database: one SQLite file, for one host (replicas on it share the file; SQLite's locks do not
work over network filesystems, so several machines need PostgreSQL).

sqlite3 blocks, so each connection lives on a thread of its own, never the event loop's and never asyncio's
default pool (which /infer uses): a store locked by another process stalls only the job routes, and only for
the store's timeout (the busy timeout bounds each statement).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from app.jobs.schema import Result, migrations

CONNECTIONS = 4  # the worker's tick, callbacks and the routes each get one without waiting on the others


class _Connection:
    """One sqlite3 connection and the one thread that uses it."""

    def __init__(self, path: Path, timeout_s: float):
        self._path, self._timeout_s = path, timeout_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._db: sqlite3.Connection | None = None

    def call(self, function, *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def connect(self) -> None:
        db = sqlite3.connect(str(self._path), isolation_level=None, timeout=self._timeout_s,
                             check_same_thread=False)
        try:
            db.create_function("epoch_now", 0, time.time)  # the same SQL as PostgreSQL's epoch_now()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash, fsync at checkpoints
        except BaseException:
            db.close()
            raise
        self._db = db

    def execute(self, sql: str, args: Sequence[Any]) -> Result:
        cursor = self._db.execute(sql, tuple(args))
        rows = cursor.fetchall()
        return Result(rows, cursor.rowcount)

    def script(self, statements: list[str]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                self._db.execute(statement)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def rollback_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False)


class SQLiteTransaction:
    def __init__(self, connection: _Connection):
        self._connection = connection

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        return await self._connection.call(self._connection.execute, sql, args)


class SQLiteDatabase:
    kind = "sqlite"
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    serialize_adds: str | None = None  # BEGIN IMMEDIATE already serializes writers

    def __init__(self, path: str, timeout_s: float):
        self.path = Path(path).expanduser()
        self.label = f"sqlite:{self.path}"
        self._timeout_s = timeout_s
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self._all: list[_Connection] = []

    async def open(self) -> None:
        """Create the file and its folder, migrate the schema, open the connections; raises what went wrong."""
        def prepare() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_dir():
                raise sqlite3.OperationalError(f"{self.path} is a folder, not a database file")

        first = _Connection(self.path, self._timeout_s)
        try:
            await first.call(prepare)
            await first.call(first.connect)
            await first.call(first.script, migrations("sqlite", await first.call(self._columns, first)))
        except BaseException:
            await first.call(first.close)
            first.shutdown()
            raise
        connections = [first]
        for _ in range(CONNECTIONS - 1):
            connection = _Connection(self.path, self._timeout_s)
            await connection.call(connection.connect)
            connections.append(connection)
        self._all = connections
        for connection in connections:
            self._idle.put_nowait(connection)

    @staticmethod
    def _columns(connection: _Connection) -> set[str] | None:
        rows = connection.execute("PRAGMA table_info(jobs)", ()).rows
        return {row[1] for row in rows} if rows else None

    @contextlib.asynccontextmanager
    async def transaction(self, write: bool) -> AsyncIterator[SQLiteTransaction]:
        """A transaction on an idle connection. The caller bounds the whole of it in time; a statement still
        running on its thread when the caller gives up is rolled back there before the connection is reused."""
        connection = await self._idle.get()
        loop = asyncio.get_running_loop()
        committed = False
        try:
            await connection.call(connection.execute, "BEGIN IMMEDIATE" if write else "BEGIN", ())
            yield SQLiteTransaction(connection)
            await connection.call(connection.execute, "COMMIT", ())
            committed = True
        finally:
            if committed:
                self._idle.put_nowait(connection)
            else:
                # Not awaited: a caller past its deadline must not wait for a locked statement to give up.
                future = connection._thread.submit(connection.rollback_quietly)
                future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._idle.put_nowait, connection))

    async def close(self) -> None:
        for connection in self._all:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.call(connection.close), 2)
            connection.shutdown()
        self._all = []
