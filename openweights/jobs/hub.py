"""Push a job's model to the Hugging Face Hub when the org has `HF_TOKEN` (and `HF_ORG` or `HF_USER`).

openweights' own storage is always the primary copy (the model registry); the Hub is a mirror that
the org opts into by setting the secrets. Checkpoints go up as `checkpoint-N/` subfolders, as the
original did, without their optimizer state. `HF_ENDPOINT` (a secret too) points at another Hub.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HUB_IGNORE", "hub_repo_id", "push_folder"]

#: Resumption state stays in openweights' storage; the Hub gets weights, config and tokenizer.
HUB_IGNORE = ["**/optimizer.pt", "**/scheduler.pt", "**/rng_state*.pth", "**/training_args.bin"]


def hub_repo_id(model_name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Where `model_name` goes on the Hub, or None when the org set no HF_TOKEN / HF_ORG / HF_USER.

    The name's own organization part is kept when it is the Hub org/user; otherwise the Hub
    org/user replaces it (`lab/qwen-ft-ftjob-1` → `HF_ORG/qwen-ft-ftjob-1`)."""
    env = os.environ if env is None else env
    owner = env.get("HF_ORG") or env.get("HF_USER")
    if not env.get("HF_TOKEN") or not owner:
        return None
    org, _, name = model_name.partition("/")
    return model_name if org == owner else f"{owner}/{name or org}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str = "openweights: upload model",
) -> str:
    """Create the repo (private by default; fine if it exists) and upload `folder`. Returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=HUB_IGNORE,
    )
    return str(url)
