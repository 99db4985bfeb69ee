"""Where a job's `model` comes from, on the worker: one resolver for every job kind.

A reference is, first match wins:

1. a local directory (a full model, or a LoRA adapter: its base is read from `adapter_config.json`);
2. a model in this org's registry (`finetuned_model_id` of an earlier fine-tune), or a subfolder of one
   such as `org/name/checkpoint-10` (the original's `org/repo/subfolder` addressing); its files are
   downloaded from openweights' own storage into a local cache once;
3. anything else is a Hugging Face Hub id, loaded with the real `from_pretrained` code.

```python
m = resolve_model("me/tiny-ft-ftjob-abc/checkpoint-5", ow=ow)
m.base, m.adapter          # what from_pretrained loads; the LoRA adapter dir or None
model, tokenizer = load_model(m)
```
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openweights._exceptions import OpenWeightsError

if TYPE_CHECKING:
    from openweights.client._client import OpenWeights

__all__ = ["LocalModel", "ModelNotFoundError", "load_model", "resolve_model"]

ADAPTER_CONFIG = "adapter_config.json"


class ModelNotFoundError(OpenWeightsError):
    """A model reference that is neither a local path, a registered model, nor a Hub id we can load."""


@dataclass(frozen=True)
class LocalModel:
    """A resolved model: `base` is what `from_pretrained` loads (a local dir or a Hub id)."""

    name: str
    base: str
    adapter: str | None = None
    #: the registry entry when the reference named one
    registered: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None


def _cache_root() -> Path:
    from openweights._settings import Settings

    return Path(os.environ.get("OPENWEIGHTS_MODEL_CACHE") or Settings().home / "models")


def _adapter_base(adapter_dir: Path, *, ow: OpenWeights | None, depth: int) -> LocalModel:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base_ref = config.get("base_model_name_or_path")
    if not base_ref:
        raise ModelNotFoundError(
            f"{adapter_dir}/{ADAPTER_CONFIG} names no base_model_name_or_path: cannot load the adapter"
        )
    base = resolve_model(base_ref, ow=ow, _depth=depth + 1)
    if base.adapter is not None:
        raise ModelNotFoundError(
            f"adapter {adapter_dir} is on top of another adapter ({base_ref}); merge that one first"
        )
    return base


def _from_dir(name: str, path: Path, *, ow: OpenWeights | None, depth: int, registered=None):
    if (path / ADAPTER_CONFIG).is_file():
        base = _adapter_base(path, ow=ow, depth=depth)
        return LocalModel(name=name, base=base.base, adapter=str(path), registered=registered)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {name!r}: {path} has neither config.json nor {ADAPTER_CONFIG}"
        )
    return LocalModel(name=name, base=str(path), registered=registered)


def _split_registered(ow: OpenWeights, ref: str) -> tuple[dict[str, Any], str] | None:
    """(registry entry, subfolder) for `org/name` or `org/name/sub/folder`, else None."""
    parts = ref.strip("/").split("/")
    for cut in range(len(parts), 1, -1):
        name = "/".join(parts[:cut])
        try:
            entry = ow.models.retrieve(name)
        except OpenWeightsError as e:
            if getattr(e, "status_code", None) == 404:
                continue
            raise
        return dict(entry), "/".join(parts[cut:])
    return None


def _download(ow: OpenWeights, entry: dict[str, Any], subfolder: str) -> Path:
    """The entry's files under `subfolder`, in a cache keyed by their content: downloaded once."""
    files: dict[str, str] = entry["files"]
    prefix = f"{subfolder}/" if subfolder else ""
    wanted = {
        rel[len(prefix) :]: fid
        for rel, fid in files.items()
        if rel.startswith(prefix)
        # the root of a model is itself, not its checkpoints
        and (subfolder or not rel.startswith("checkpoint-"))
    }
    if not wanted:
        raise ModelNotFoundError(
            f"model {entry['id']!r} has no subfolder {subfolder!r}; it has: "
            + ", ".join(sorted({r.split("/")[0] for r in files}))
        )
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:24]
    target = _cache_root() / digest
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        for rel, fid in wanted.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            ow.files.download(fid, dest)
        (tmp / ".complete").write_text(entry["id"])
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(ref: str, *, ow: OpenWeights | None = None, _depth: int = 0) -> LocalModel:
    """Resolve a model reference (see the module docstring); `ow` enables the registry."""
    if _depth > 4:
        raise ModelNotFoundError(f"model {ref!r}: adapters nest too deep")
    if not ref or not ref.strip():
        raise ModelNotFoundError("model: empty reference")
    path = Path(ref).expanduser()
    if path.is_dir():
        return _from_dir(ref, path.resolve(), ow=ow, depth=_depth)
    if ref.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model {ref!r}: no such directory")
    if ow is not None and "/" in ref:
        found = _split_registered(ow, ref)
        if found is not None:
            entry, sub = found
            local = _download(ow, entry, sub)
            return _from_dir(ref, local, ow=ow, depth=_depth, registered=entry)
    return _hub(ref, ow=ow, depth=_depth)


def _hub(ref: str, *, ow: OpenWeights | None, depth: int) -> LocalModel:
    """A Hub id: a full model, or an adapter repo (`org/repo` or `org/repo/subfolder`)."""
    parts = ref.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - transformers always brings it
        return LocalModel(name=ref, base=ref)
    try:
        config = hf_hub_download(repo, f"{sub}/{ADAPTER_CONFIG}" if sub else ADAPTER_CONFIG)
    except EntryNotFoundError:
        if sub:
            raise ModelNotFoundError(f"model {ref!r}: no adapter at {sub!r} in {repo}") from None
        return LocalModel(name=ref, base=ref)
    except Exception as e:  # offline, no such repo, gated…: from_pretrained will say which
        if sub:
            raise ModelNotFoundError(
                f"model {ref!r}: not registered here and not on the Hub ({e})"
            ) from e
        return LocalModel(name=ref, base=ref)
    adapter_dir = Path(config).parent
    base = _adapter_base(adapter_dir, ow=ow, depth=depth)
    return LocalModel(name=ref, base=base.base, adapter=str(adapter_dir))


def load_model(
    m: LocalModel,
    *,
    dtype: Any = None,
    device: str | None = None,
    merge: bool = False,
    trainable_adapter: bool = False,
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """(model, tokenizer). An adapter is applied with PEFT (merged into the weights when `merge`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    tok_source = (
        m.adapter if m.adapter and Path(m.adapter, "tokenizer_config.json").exists() else m.base
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    model = AutoModelForCausalLM.from_pretrained(m.base, dtype=dtype, **from_pretrained)
    if m.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, m.adapter, is_trainable=trainable_adapter)
        if merge:
            model = model.merge_and_unload()
    if device:
        model.to(device)
    return model, tokenizer
