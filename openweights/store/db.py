"""Engine set-up, transactions and migrations, for SQLite (embedded) and PostgreSQL (scaled out)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.exc import OperationalError

from openweights.store.queries import query

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    """Two engines over one database: reads, and writes that serialize where the dialect needs it.

    On SQLite every write transaction is `BEGIN IMMEDIATE`, so two writers never deadlock on a
    lock upgrade; reads use deferred transactions and run beside a writer thanks to WAL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect == "sqlite":
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.read_engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            self.write_engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            for engine, begin in (
                (self.read_engine, "BEGIN"),
                (self.write_engine, "BEGIN IMMEDIATE"),
            ):
                _sqlite_setup(engine, begin)
        else:
            self.read_engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
            self.write_engine = self.read_engine

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.read_engine.connect() as conn:
            yield conn
            conn.rollback()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; retried by callers never: SQLite waits on its busy timeout."""
        with self.write_engine.begin() as conn:
            yield conn

    def now(self, conn: Connection) -> float:
        """The database's clock: leases never depend on a worker's or a second server's clock."""
        if self.is_sqlite:
            return time.time()  # one server process owns the file: its clock is the database's
        return float(conn.execute(query(conn, "clock")).scalar_one())

    def notify(self, conn: Connection, channel: str, keys: list[str]) -> None:
        """PostgreSQL: NOTIFY `keys` on `channel` when this transaction commits (one round trip).
        SQLite has one server process: nothing to tell."""
        if keys and not self.is_sqlite:
            conn.execute(query(conn, "notify"), {"channel": channel, "keys": list(keys)})

    def migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        for attempt in range(50):
            try:
                with self.write_engine.begin() as conn:
                    if not self.is_sqlite:
                        # several servers may start at once: one migrates, the others wait
                        conn.execute(text("SELECT pg_advisory_xact_lock(74031)"))
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                return
            except OperationalError as e:  # database still starting
                if attempt == 49:
                    raise
                log.warning("database not ready (%s); retrying", e.__class__.__name__)
                time.sleep(0.2)

    def dispose(self) -> None:
        self.read_engine.dispose()
        self.write_engine.dispose()


def _sqlite_setup(engine, begin_sql: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # straight to the driver: every transaction pays this, and it returns nothing
        conn.connection.dbapi_connection.execute(begin_sql)
