"""The web dashboard: server-rendered pages on the API's own app (`/dashboard/`).

`install(app)` mounts it; see `docs/dashboard.md`."""

from openweights.server.dashboard.routes import PREFIX, install

__all__ = ["PREFIX", "install"]
