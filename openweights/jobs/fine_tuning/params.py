"""Fine-tuning parameters, as the original openweights names and defaults them."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: File purposes of chats: test files, logp and sampling datasets.
CHAT_PURPOSES = ("conversations", "weighted_conversations")
#: Where a training job writes its model (and checkpoints): stored as the job's results.
OUTPUT_DIR = "uploads/model"

DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


class SamplingCallback(BaseModel):
    """Generate from `dataset` every `eval_steps` steps; rows land in a jsonl file with `completion`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="File id of a conversations file (prompts).")
    eval_steps: int | Literal["log"] = 10
    batch_size: int = Field(default=8, ge=1)
    tag: str = "samples"
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=600, ge=1)


class TrainingConfig(BaseModel):
    """`ow.fine_tuning.create(...)` parameters. Defaults follow the original openweights."""

    model_config = ConfigDict(extra="forbid")

    #: File purposes a `loss="sft"` training file may have.
    sft_purposes: ClassVar[tuple[str, ...]] = ("conversations",)

    model: str = Field(description="Hub id, local path, or a model made by an earlier fine-tune.")
    training_file: str = Field(
        description="File id: conversations (sft) or preference (dpo, orpo)."
    )
    test_file: str | None = Field(default=None, description="Conversations file for eval loss.")
    loss: Literal["sft", "dpo", "orpo"]
    chat_template: str = Field(default="default", description='"default": the tokenizer\'s own.')
    finetuned_model_id: str = Field(
        default="{org_id}/{model_name}-{job_id}",
        description="Name of the result; `{org_id}`, `{model_name}`, `{job_id}` and any string param are filled in.",
    )
    model_naming_extra_parameters: dict[str, Any] | None = None
    job_id_suffix: str | None = Field(default=None, description="Forces a distinct job.")
    max_seq_length: int = Field(default=2048, ge=8)
    truncation: bool = Field(
        default=True,
        description="Cut rows longer than max_seq_length; False: such a row fails the job at "
        "start, naming its file and line.",
    )
    load_in_4bit: bool = Field(
        default=False,
        description="QLoRA: load the base in 4-bit (NF4, bitsandbytes; with unsloth, its own "
        "4-bit loading). CUDA only: a CPU worker ignores it, trains in float32 and says so in the "
        "job's `engine` event; a CUDA worker without bitsandbytes fails the job with the install "
        "hint. Needs is_peft=True.",
    )
    use_unsloth: bool | None = Field(
        default=None,
        description="None (auto): unsloth on a CUDA worker where it is installed, for a new LoRA "
        'on a base model with loss="sft"; True: require it on CUDA (any loss; a CUDA worker '
        "without it fails the job); False: never. CPU workers always train with transformers. "
        "The engine used (unsloth or transformers, dtype, 4-bit) is the job's `engine` event.",
    )
    # LoRA
    is_peft: bool = True
    target_modules: list[str] | None = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_bias: Literal["all", "none", "lora_only"] = "none"
    r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    use_rslora: bool = True
    merge_before_push: bool = True
    push_to_private: bool = True
    # optimisation
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    per_device_train_batch_size: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    warmup_steps: int = Field(default=5, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping; 0: off.")
    learning_rate: float | str = 1e-4
    logging_steps: int = Field(default=1, ge=1)
    optim: str = "adamw_8bit"
    weight_decay: float = 0.01
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    seed: int = 3407
    beta: float = Field(default=0.1, description="DPO / ORPO beta.")
    save_steps: int = Field(
        default=5000, ge=1, description="A checkpoint every N steps, at uploads/model/checkpoint-N."
    )
    output_dir: str = Field(
        default=OUTPUT_DIR,
        description="Fixed: the model and its checkpoints are written under uploads/model and "
        "stored as the job's results (the original's './tmp' is accepted and means the same).",
    )
    train_on_responses_only: bool = True
    packing: bool = False
    # callbacks
    logp_callback_datasets: dict[str, str] = Field(default_factory=dict)
    eval_every_n_steps: int | Literal["log"] = 5000
    sampling_callbacks: list[SamplingCallback] | None = None
    eval_batch_size: int = Field(default=8, ge=1)
    test_file_eval_steps: int | None = None
    test_file_eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    meta: dict[str, Any] | None = None

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float | str) -> float:
        try:
            lr = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"learning_rate must be a number, got {v!r}") from None
        if not 0 < lr < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {lr}")
        return lr

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if v.strip("./") not in ("tmp", OUTPUT_DIR, ""):
            raise ValueError(
                f"output_dir is fixed to {OUTPUT_DIR!r} (stored as the job's results); got {v!r}"
            )
        return OUTPUT_DIR

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        want = self.sft_purposes if self.loss == "sft" else ("preference",)
        purpose = self.training_file.split(":", 1)[0] if ":file-" in self.training_file else None
        if purpose is not None and purpose not in want:
            raise ValueError(
                f"training_file: loss={self.loss!r} needs a {' or '.join(map(repr, want))} file, "
                f"got a {purpose!r} file ({self.training_file}); upload it with "
                f"purpose={want[0]!r}."
            )
        chat_files = {"test_file": self.test_file}
        chat_files.update(
            {f"logp_callback_datasets[{k!r}]": v for k, v in self.logp_callback_datasets.items()}
        )
        chat_files.update(
            {
                f"sampling_callbacks[{i}].dataset": s.dataset
                for i, s in enumerate(self.sampling_callbacks or [])
            }
        )
        for name, fid in chat_files.items():
            if fid and ":file-" in fid and fid.split(":", 1)[0] not in CHAT_PURPOSES:
                raise ValueError(f"{name}: must be a 'conversations' file, got {fid!r}.")
        if self.load_in_4bit and not self.is_peft:
            raise ValueError(
                "load_in_4bit: 4-bit weights cannot be trained directly; use is_peft=True (QLoRA)."
            )
        if self.load_in_4bit and self.logp_callback_datasets:
            raise ValueError("logp_callback_datasets: not supported together with load_in_4bit.")
        if "/" not in self.finetuned_model_id:
            raise ValueError("finetuned_model_id: must look like 'org/model'.")
        org = self.finetuned_model_id.split("/", 1)[0]
        if org in ("datasets", "models", "unsloth", "None", ""):
            raise ValueError(f"finetuned_model_id: {org!r} cannot be the organization part.")
        return self
