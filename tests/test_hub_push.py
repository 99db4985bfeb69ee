"""Pushing a model to the Hugging Face Hub: the real `huggingface_hub` client against a local Hub double."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openweights.jobs.hub import hub_repo_id
from tests.hf_hub_double import HubDouble


@pytest.fixture
def hub():
    double = HubDouble().start()
    yield double
    double.stop()


def _push(hub, folder, repo_id, tmp_path, token):
    code = (
        "from openweights.jobs.hub import push_folder; "
        f"print(push_folder({str(folder)!r}, {repo_id!r}))"
    )
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_push_uploads_weights_and_checkpoints_without_optimizer_state(hub, tmp_path):
    folder = tmp_path / "model"
    (folder / "checkpoint-5").mkdir(parents=True)
    files = {
        "adapter_config.json": b'{"r": 4}',
        "adapter_model.safetensors": bytes(range(256)) * 64,
        "checkpoint-5/adapter_model.safetensors": b"\x01\x02" * 1000,
        "checkpoint-5/optimizer.pt": b"big optimizer state",
        "checkpoint-5/trainer_state.json": b"{}",
    }
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    done = _push(hub, folder, "lab/tiny-ft", tmp_path, hub.token)
    assert done.returncode == 0, done.stderr[-3000:]
    repo = hub.repos["lab/tiny-ft"]
    assert repo.private
    expected = {k: v for k, v in files.items() if not k.endswith("optimizer.pt")}
    assert repo.files == expected
    # pushing again (a restarted job) updates the existing repo
    assert _push(hub, folder, "lab/tiny-ft", tmp_path, hub.token).returncode == 0
    assert len(repo.commits) == 2


def test_push_with_a_wrong_token_fails_with_the_hub_message(hub, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    done = _push(hub, tmp_path / "m", "lab/x", tmp_path, "hf_wrong")
    assert done.returncode != 0
    assert "401" in done.stderr and "lab/x" not in hub.repos


def test_repo_id_follows_the_org_secrets():
    assert hub_repo_id("lab/m-ftjob-1", {}) is None
    assert hub_repo_id("lab/m-ftjob-1", {"HF_TOKEN": "t"}) is None
    assert hub_repo_id("lab/m-ftjob-1", {"HF_TOKEN": "t", "HF_ORG": "lab"}) == "lab/m-ftjob-1"
    assert hub_repo_id("lab/m-ftjob-1", {"HF_TOKEN": "t", "HF_USER": "me"}) == "me/m-ftjob-1"
