"""Test helpers for openweights and its users: a tiny chat model made offline in seconds, and
small datasets in each file format. Heavy imports (torch, transformers) happen inside functions."""

from openweights.testing.data import (
    conversations_rows,
    preference_rows,
    weighted_rows,
    write_jsonl,
)
from openweights.testing.tiny_model import CHAT_TEMPLATE, make_tiny_model

__all__ = [
    "CHAT_TEMPLATE",
    "conversations_rows",
    "make_tiny_model",
    "preference_rows",
    "weighted_rows",
    "write_jsonl",
]
