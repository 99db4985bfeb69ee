"""The managed cluster: one manager per org that ran `ow manage start`, run by the server operator.

`ow cluster --supervise` runs next to the server with access to its database (the same
`OPENWEIGHTS_DATABASE_URL` / `OPENWEIGHTS_HOME` and secret key). Every `scan_s` it lists the orgs
whose secret `OW_MANAGED` is true, and for each runs a `ClusterManager` in a thread, with a user
token it mints for that manager (revoked when the org is unmanaged or the supervisor stops) and the
provider key from the org's secrets. Managers still talk to the server over HTTP and hold the org's
lease, so a user's own `ow cluster` and the managed one never act at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from openweights._settings import Settings
from openweights.cluster.manager import ClusterManager, ManagerConfig, config_from_secrets
from openweights.cluster.providers.base import Provider, ProviderError

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)

TOKEN_NAME = "managed cluster manager"
#: A manager's token is replaced (manager restarted) after this long, so none lives forever.
TOKEN_ROTATE_S = 86400.0


@dataclass
class _Managed:
    manager: ClusterManager
    thread: threading.Thread
    token_id: str
    key: str | None
    started: float


def _runpod(secrets: dict[str, str]) -> Provider:
    from openweights.cluster.providers.runpod import RunPodProvider

    return RunPodProvider(secrets.get("RUNPOD_API_KEY"))


class Supervisor:
    """Runs a manager for every managed org; `run()` blocks until `stop()`."""

    def __init__(
        self,
        *,
        server_url: str,
        settings: Settings | None = None,
        config: ManagerConfig | None = None,
        provider_factory: Callable[[dict[str, str]], Provider] = _runpod,
        scan_s: float = 15.0,
    ) -> None:
        from openweights.store.crypto import SecretBox, load_keys
        from openweights.store.db import Database

        self.settings = settings or Settings()
        self.server_url = server_url.rstrip("/")
        self.config = config or ManagerConfig()
        self.provider_factory = provider_factory
        self.scan_s = scan_s
        self.db = Database(self.settings.resolved_database_url())
        self.box = SecretBox(load_keys(self.settings.secret_key, self.settings.home))
        self.managed: dict[str, _Managed] = {}
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.scan()
                except Exception:  # keep supervising: one bad scan must not stop every org
                    logger.exception("supervisor scan failed")
                self._stop.wait(self.scan_s)
        finally:
            for org_id in list(self.managed):
                self._retire(org_id)
            self.db.dispose()

    def scan(self) -> None:
        from openweights.store import cluster as cq

        with self.db.read() as conn:
            wanted = cq.managed_orgs(conn, self.box.decrypt)
        now = time.time()
        for org_id in list(self.managed):
            m = self.managed[org_id]
            key = wanted.get(org_id, {}).get("RUNPOD_API_KEY")
            if (
                org_id not in wanted
                or not m.thread.is_alive()
                or key != m.key
                or now - m.started > TOKEN_ROTATE_S
            ):
                self._retire(org_id)
        for org_id, secrets in wanted.items():
            if org_id not in self.managed:
                self._start(org_id, secrets)

    def _start(self, org_id: str, secrets: dict[str, str]) -> None:
        from openweights.store import orgs

        try:
            provider = self.provider_factory(secrets)
            config = config_from_secrets(secrets, self.config)
        except (ProviderError, ValueError) as e:
            logger.warning("org %s is managed but cannot be: %s", org_id, e)
            return
        with self.db.write() as conn:
            now = self.db.now(conn)
            row, token = orgs.create_token(
                conn,
                org_id=org_id,
                name=TOKEN_NAME,
                kind="user",
                now=now,
                expires_at=now + 2 * TOKEN_ROTATE_S,
            )
        manager = ClusterManager(
            url=self.server_url,
            api_key=token,
            provider=provider,
            config=replace(config),
        )
        thread = threading.Thread(target=manager.run, name=f"manager-{org_id}", daemon=True)
        thread.start()
        self.managed[org_id] = _Managed(
            manager, thread, row["id"], secrets.get("RUNPOD_API_KEY"), time.time()
        )
        logger.info("managing org %s on %s", org_id, provider.name)

    def _retire(self, org_id: str) -> None:
        from openweights.store import orgs

        m = self.managed.pop(org_id)
        m.manager.stop()
        m.thread.join(60)
        with self.db.write() as conn:
            orgs.revoke_token(conn, org_id, m.token_id, self.db.now(conn))
        logger.info("stopped managing org %s", org_id)
