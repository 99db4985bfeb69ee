"""What the server holds: settings, database, blob store, secret box and notifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Connection

from openweights._settings import Settings
from openweights.server.auth import AuthCache
from openweights.server.env_cache import SecretEnvCache
from openweights.server.notify import CHANNEL, Notifier
from openweights.store import orgs
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
        self.env_cache = SecretEnvCache()
        from openweights.server.routes.openai import DeploymentRoutes

        #: where `/v1/chat/completions` sends each model (cached per org; see routes/openai.py)
        self.deployments = DeploymentRoutes()
        self.notifier = Notifier(
            hooks={
                "auth:": self.auth_cache.drop,
                "secrets:": self.env_cache.drop,
                "job:": self.deployments.drop,
            }
        )
        self.tmp_dir = settings.home / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        #: sha256 of blobs known to be in the blob store (content-addressed: they stay)
        self.known_blobs: set[str] = set()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking store work off the event loop."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    def publish(self, conn: Connection, *keys: str) -> None:
        """Inside a write transaction: tell other servers (PostgreSQL) once it commits, in one
        statement. This server learns the same keys after the commit (`notifier.notify` on the
        loop, or `committed` from the thread): cache keys (`auth:`, `secrets:`) are dropped
        after the commit, never before, or a concurrent request could cache what it read before
        it."""
        self.db.notify(conn, CHANNEL, list(keys))

    def committed(self, *keys: str) -> None:
        """From a store call's thread, once its write transaction committed: wake this server's
        long-polls on `keys` and drop the cache entries they name. Scheduled on the event loop
        before the call's own result, so it has happened when the route answers."""
        self.notifier.notify_threadsafe(*keys)

    def org_secrets(self, conn: Connection, org_id: str) -> dict[str, str]:
        """All the org's decrypted secrets (cached; see `env_cache`)."""
        return self.env_cache.get(org_id, lambda: orgs.secret_env(conn, org_id, self.box))

    def secret_env(self, conn: Connection, org_id: str) -> dict[str, str]:
        """The org's secrets a job gets: all but the cluster manager's own (the provider key and
        its limits), which no job needs."""
        return _for_jobs(self.org_secrets(conn, org_id))

    def cached_secret_env(self, org_id: str) -> dict[str, str] | None:
        """`secret_env` when the org's secrets are cached; None (nothing read) otherwise."""
        env = self.env_cache.peek(org_id)
        return None if env is None else _for_jobs(env)


def _for_jobs(env: dict[str, str]) -> dict[str, str]:
    """An org's secrets less the cluster manager's own (the provider key and its limits)."""
    from openweights.types.cluster import JOB_HIDDEN_SECRETS

    return {k: v for k, v in env.items() if k not in JOB_HIDDEN_SECRETS}
