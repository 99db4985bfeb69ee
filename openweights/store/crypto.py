"""Org secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256), MultiFernet for key rotation."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["InvalidToken", "SecretBox", "load_keys"]


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one secret key is needed")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    def encrypt(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def decrypt(self, token: bytes) -> str:
        return self._fernet.decrypt(bytes(token)).decode()

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt under the newest key (the first one)."""
        return self._fernet.rotate(bytes(token))


def load_keys(configured: str | None, home: Path) -> list[str]:
    """Keys from OPENWEIGHTS_SECRET_KEY (comma-separated, newest first), else one generated
    once into $OPENWEIGHTS_HOME/secret.key with mode 0600."""
    if configured:
        return [k.strip() for k in configured.split(",") if k.strip()]
    path = home / "secret.key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
    return [path.read_text().strip()]
