"""What the server holds: settings, database, blob store, secret box and notifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Connection, text

from openweights._settings import Settings
from openweights.server.auth import AuthCache
from openweights.server.notify import CHANNEL, Notifier
from openweights.store.blobs import open_blob_store
from openweights.store.crypto import SecretBox, load_keys
from openweights.store.db import Database

T = TypeVar("T")


class AppState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.resolved_database_url())
        self.blobs = open_blob_store(settings.resolved_storage_url(), settings.home)
        self.box = SecretBox(load_keys(settings.secret_key, settings.home))
        self.auth_cache = AuthCache()
        self.notifier = Notifier(on_auth=self.auth_cache.drop)
        self.tmp_dir = settings.home / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking store work off the event loop."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    def publish(self, conn: Connection, *keys: str) -> None:
        """Inside a write transaction: tell other servers (PostgreSQL) once it commits."""
        if not self.db.is_sqlite:
            for key in keys:
                conn.execute(text("SELECT pg_notify(:c, :k)"), {"c": CHANNEL, "k": key})

    def revoked(self, conn: Connection, key: str) -> None:
        """A token (`auth:token:<id>`) or a run's token (`auth:run:<id>`) stopped being valid."""
        self.auth_cache.drop(key)
        self.publish(conn, key)
