"""Token-weighted SFT on transformers' `Trainer` (worker side).

Each row is tokenized once (`blocks.tokenize_conversation`); the loss of a batch is
`sum_t w_t * nll_t / sum_t |w_t|` over the predicted tokens, so weight 0 ignores a token, a
negative weight pushes its likelihood down, and the scale of the weights does not change the
step size (as in the original openweights).
"""

from __future__ import annotations

from typing import Any

from openweights.jobs.weighted_sft.blocks import default_weight, tokenize_conversation

__all__ = ["Collator", "make_trainer", "tokenize_rows", "weighted_loss"]


def tokenize_rows(rows: list[dict], tokenizer: Any, cfg: Any) -> list[dict]:
    def weight_of(role: str) -> float:
        return default_weight(role, cfg.train_on_responses_only)

    out = []
    for row in rows:
        t = tokenize_conversation(tokenizer, row["messages"], weight_of=weight_of)
        ids, weights = t.input_ids, t.weights
        if len(ids) > cfg.max_seq_length:  # truncation=False was checked before
            ids, weights = ids[: cfg.max_seq_length], weights[: cfg.max_seq_length]
        out.append({"input_ids": ids, "token_weights": weights})
    return out


class Collator:
    """Right-pads `input_ids` and `token_weights`; `labels` marks the weighted tokens (for
    transformers' bookkeeping: evaluation computes a loss only when labels are present)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        weights = torch.zeros((n, width), dtype=torch.float32)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            weights[i, :k] = torch.tensor(f["token_weights"], dtype=torch.float32)
        labels = ids.masked_fill(weights == 0, -100)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_weights": weights,
            "labels": labels,
        }


def weighted_loss(logits: Any, input_ids: Any, weights: Any) -> Any:
    import torch

    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        input_ids[:, 1:].reshape(-1),
        reduction="none",
    ).view(input_ids.size(0), -1)
    w = weights[:, 1:].to(nll.dtype)
    total = w.abs().sum()
    if total == 0:
        return (nll * 0).sum()  # keeps the graph: a batch of ignored tokens is a zero step
    return (nll * w).sum() / total


def make_trainer(
    *,
    cfg: Any,
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    test_rows: list[dict],
    peft_config: Any,
    args: dict,
    callbacks: list,
) -> Any:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class WeightedTrainer(Trainer):
        # The loss is a per-batch weighted mean: the Trainer averages it over accumulation.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("token_weights")
            inputs.pop("labels", None)
            outputs = model(**inputs)
            loss = weighted_loss(outputs.logits, inputs["input_ids"], weights)
            return (loss, outputs) if return_outputs else loss

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if args.get("gradient_checkpointing"):
        model.enable_input_require_grads()
    train = Dataset.from_list(tokenize_rows(rows, tokenizer, cfg))
    test = Dataset.from_list(tokenize_rows(test_rows, tokenizer, cfg)) if test_rows else None
    return WeightedTrainer(
        model=model,
        args=TrainingArguments(**args, remove_unused_columns=False, label_names=["labels"]),
        train_dataset=train,
        eval_dataset=test,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
