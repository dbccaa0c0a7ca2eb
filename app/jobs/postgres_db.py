"""The shared job database: PostgreSQL through psycopg 3's asyncio driver and its connection pool, for replicas on
many machines. Every statement is bounded by the server (statement and lock timeouts) as well as by the caller.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from app.jobs.schema import Result, migrations

POOL_SIZE = 4
# One number for the whole cluster: submissions count MAX_JOBS under it, migrations run under it one at a time.
ADVISORY_LOCK = 0x766C6D6A  # "vlmj"


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def without_password(url: str) -> str:
    """The URL as logs, /health and metric labels may show it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class PostgresTransaction:
    def __init__(self, connection: Any):
        self._connection = connection

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cursor = await self._connection.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(args))
        rows = await cursor.fetchall() if cursor.description is not None else []
        return Result(rows, cursor.rowcount)


class PostgresDatabase:
    kind = "postgresql"
    serialize_adds = f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"

    def __init__(self, url: str, timeout_s: float):
        import psycopg  # imported here: an SQLite deployment needs no PostgreSQL driver at all
        from psycopg_pool import PoolTimeout

        self.errors: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout)
        self.label = without_password(url)
        self._url, self._timeout_s = url, timeout_s
        self._pool: Any = None

    async def open(self) -> None:
        """Connect and migrate the schema (one replica at a time); raises what went wrong. A pool that could not
        open is closed, and the next try starts a new one."""
        from psycopg_pool import AsyncConnectionPool

        milliseconds = int(self._timeout_s * 1000)
        self._pool = AsyncConnectionPool(
            self._url, min_size=1, max_size=POOL_SIZE, open=False, timeout=self._timeout_s, name="jobs",
            kwargs={"autocommit": True, "connect_timeout": max(int(self._timeout_s), 2),
                    "options": f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}",
                    "application_name": "vlm-inference"})
        try:
            await self._pool.open(wait=True, timeout=self._timeout_s)
            async with self.transaction(write=True) as transaction:
                await transaction.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")
                rows = (await transaction.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = 'jobs'")).rows
                for statement in migrations("postgresql", {row[0] for row in rows} if rows else None):
                    await transaction.execute(statement)
        except BaseException:
            await self.close()
            raise

    @contextlib.asynccontextmanager
    async def transaction(self, write: bool) -> AsyncIterator[PostgresTransaction]:
        async with self._pool.connection() as connection, connection.transaction():
            yield PostgresTransaction(connection)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=2)
