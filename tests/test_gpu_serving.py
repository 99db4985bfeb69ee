"""A vLLM deployment on a lent GPU: `vllm serve` behind the deployment's front, base and LoRA.

Skipped (with the reason) where there is no CUDA GPU or vLLM is not installed; run by
`bench/gpu_check.sh`. The CPU twin (`transformers serve`) is covered by tests/test_deploy.py.
"""

from __future__ import annotations

import pytest

from openweights.testing import make_tiny_model

pytestmark = pytest.mark.requires_gpu


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    """A LoRA adapter on the tiny model whose weights change its answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture
def vllm_gpu():
    """Skip before any model is made where this cannot run."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from openweights.jobs.serving import is_vllm_available

    if not is_vllm_available():
        pytest.skip('vLLM is not installed: pip install "openweights[vllm]"')


def test_vllm_deployment_serves_base_and_lora_only_with_its_key(
    vllm_gpu, tiny_model, adapter_dir, tmp_path
):
    import httpx

    from openweights.jobs.serving import ServingOptions, serve

    options = ServingOptions(
        engine="vllm", max_model_len=256, max_num_seqs=8, max_lora_rank=8, ready_timeout_s=300
    )
    models = [str(tiny_model), str(adapter_dir)]
    with serve(models, options=options, workdir=tmp_path, public=False) as s:
        assert s.engine == "vllm"
        assert set(s.model_names) == set(models)
        answers = {}
        for name in models:
            r = httpx.post(
                f"{s.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {s.api_key}"},
                json={
                    "model": name,
                    "messages": [{"role": "user", "content": "apple river stone"}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=120,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name
            assert body["usage"]["completion_tokens"] >= 1
            answers[name] = body["choices"][0]["message"]["content"]
        # the LoRA is really applied: its greedy answer differs from the base's
        assert answers[str(tiny_model)] != answers[str(adapter_dir)]
        listed = httpx.get(
            f"{s.base_url}/models", headers={"Authorization": f"Bearer {s.api_key}"}, timeout=30
        ).json()
        assert {m["id"] for m in listed["data"]} >= set(models)
        anonymous = httpx.post(
            f"{s.base_url}/chat/completions",
            json={"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert anonymous.status_code == 401
