"""`ow.weighted_sft`: SFT where each content block's `weight` scales its tokens' loss.

Training files are block-formatted conversations (purpose `conversations` or
`weighted_conversations`): `{"type": "text", "text": ..., "weight": w, "tag": ...}`. Weight 0
ignores a block's tokens, a negative weight pushes their likelihood down (unlearning). String
content and blocks without `weight` weigh 1 in assistant messages and 0 elsewhere (1 everywhere
with `train_on_responses_only=False`). Every other parameter, callback and output is as in
`ow.fine_tuning` (`loss` is always "sft"). How weights map to tokens: `blocks.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from openweights.client.custom_job import register
from openweights.jobs.fine_tuning import FineTuning
from openweights.jobs.fine_tuning.params import TrainingConfig

__all__ = ["WeightedSFT", "WeightedSFTConfig"]


class WeightedSFTConfig(TrainingConfig):
    """`ow.weighted_sft.create(...)` parameters: those of `ow.fine_tuning`, with `loss="sft"`."""

    sft_purposes: ClassVar[tuple[str, ...]] = ("conversations", "weighted_conversations")

    loss: Literal["sft"] = "sft"
    optim: str = "adamw_torch"


@register("weighted_sft")
class WeightedSFT(FineTuning):
    type = "fine-tuning"
    id_prefix = "sftjob"
    params = WeightedSFTConfig
    entry_module = "openweights.jobs.weighted_sft.entry"

    def _uses(self, cfg: Any) -> list[tuple[str, str]]:
        out = [(cfg.training_file, "weighted_sft")]
        if cfg.test_file:
            out.append((cfg.test_file, "weighted_sft"))
        return out
