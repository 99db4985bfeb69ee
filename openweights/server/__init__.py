"""The openweights server (FastAPI). Import `create_app` or run `serve()`; `ow serve` does."""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from openweights.server import app

        return getattr(app, name)
    raise AttributeError(name)
