"""Configuration: one `Settings`, read from `OPENWEIGHTS_*` environment variables.

Constructor arguments override the environment. Nothing else in openweights reads
`os.environ` for configuration.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENWEIGHTS_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path("~/.openweights").expanduser(),
        description="Where the embedded service keeps its database, blobs, credentials and logs.",
    )
    url: str | None = Field(
        default=None,
        description="Base URL of an openweights server. Unset: use (or start) the embedded service.",
    )
    api_key: str | None = Field(default=None, description="API token (`ow_…`) for `url`.")
    run_id: int | None = Field(
        default=None, description="Set by the worker inside a job: the run that `ow.run` logs to."
    )
    job_id: str | None = Field(default=None, description="Set by the worker inside a job.")

    # server side
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Unset: SQLite (WAL) at $OPENWEIGHTS_HOME/openweights.db.",
    )
    storage_url: str | None = Field(
        default=None,
        description="Blob store: `s3://bucket/prefix` or `file:///dir`. Unset: $OPENWEIGHTS_HOME/blobs.",
    )
    secret_key: str | None = Field(
        default=None,
        description="Fernet key(s), comma-separated, newest first, for org secrets at rest. "
        "Unset: generated once into $OPENWEIGHTS_HOME/secret.key (mode 0600).",
    )
    allow_signup: bool = Field(default=True, description="Let anyone create an org on this server.")
    lease_s: float = Field(
        default=30.0, description="A run is lost after this long without a heartbeat."
    )
    max_attempts: int = Field(default=3, description="Default attempts per job before it fails.")
    cancel_grace_s: float = Field(
        default=5.0, description="SIGTERM → SIGKILL grace for canceled jobs."
    )
    worker_offline_s: float = Field(
        default=60.0, description="A worker that has not been heard from for this long is offline."
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://") :]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{self.home / 'openweights.db'}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.home / 'blobs'}"
