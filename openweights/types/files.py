from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Purposes whose content is validated row by row on upload.
VALIDATED_PURPOSES = ("conversations", "preference", "weighted_conversations")
#: Purposes stored as they are.
RAW_PURPOSES = ("custom_job_file", "result", "log", "event", "model", "batch", "batch_output")

Purpose = Literal[
    "conversations",
    "preference",
    "weighted_conversations",
    "custom_job_file",
    "result",
    "log",
    "event",
    "model",
    "batch",
    "batch_output",
]
PURPOSES: tuple[str, ...] = VALIDATED_PURPOSES + RAW_PURPOSES


class FileObject(BaseModel):
    id: str = Field(description="`{purpose}:file-{sha256[:12]}`: the same bytes get the same id.")
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: float


class FileCheckRequest(BaseModel):
    model_config = {"strict": True}

    ids: list[str] = Field(max_length=10_000)


class FileCheckResponse(BaseModel):
    missing: list[str]
