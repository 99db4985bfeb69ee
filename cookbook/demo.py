"""openweights end to end on the embedded default — no server to start, no GPU, no network.

1. the seed's custom job (`cookbook/custom_job`): a script run as a job;
2. an SFT fine-tune (LoRA) of a tiny chat model made offline, with live progress;
3. batch inference with the fine-tuned model, by its `finetuned_model_id`, and its completions.

    python cookbook/demo.py            # OPENWEIGHTS_URL / OPENWEIGHTS_API_KEY use a server instead
"""

from __future__ import annotations

import json
import os
import runpy
import tempfile
from pathlib import Path

from openweights import OpenWeights
from openweights.testing import conversations_rows, make_tiny_model, write_jsonl

HERE = Path(__file__).parent


def main() -> None:
    ow = OpenWeights()
    print(f"openweights at {ow.base_url}\n")

    print("== 1. custom job (cookbook/custom_job) ==")
    runpy.run_path(str(HERE / "custom_job" / "client_side.py"), run_name="__main__")

    print("\n== 2. fine-tune a tiny chat model (LoRA SFT, CPU) ==")
    work = Path(os.environ.get("OW_DEMO_DIR") or Path(tempfile.gettempdir()) / "openweights-demo")
    model = os.environ.get("OW_COOKBOOK_MODEL") or str(make_tiny_model(work / "tiny-chat-model"))
    train = ow.files.upload(
        str(write_jsonl(work / "train.jsonl", conversations_rows(64))), purpose="conversations"
    )
    job = ow.fine_tuning.create(
        model=model,
        training_file=train["id"],
        loss="sft",
        epochs=3,
        learning_rate=5e-3,
        r=8,
        lora_alpha=16,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_seq_length=128,
    )
    print(f"job {job.id}: {job.status}")
    job.wait(raise_on_failure=True)  # a live progress bar on a terminal
    progress = [
        e["data"] for e in ow.events.list(job_id=job.id) if e["data"].get("type") == "progress"
    ]
    print(
        f"trained {progress[-1]['step']} steps: loss {progress[0]['loss']:.3f} → {progress[-1]['loss']:.3f}"
    )
    finetuned = job.params["validated_params"]["finetuned_model_id"]
    print(f"registered as {finetuned}: {ow.models.retrieve(finetuned)!r}")

    print("\n== 3. batch inference with the fine-tuned model ==")
    prompts = [
        {"messages": [{"role": "user", "content": row["messages"][0]["content"]}]}
        for row in conversations_rows(4, seed=7)
    ]
    inputs = ow.files.upload(
        str(write_jsonl(work / "prompts.jsonl", prompts)), purpose="conversations"
    )
    inference = ow.inference.create(
        model=finetuned, input_file_id=inputs["id"], max_tokens=12, temperature=0
    )
    inference.wait(raise_on_failure=True)
    for line in ow.files.content(inference.outputs["file"]).decode().splitlines():
        row = json.loads(line)
        print(f"  {row['messages'][-1]['content']!r} → {row['completion']!r}")


if __name__ == "__main__":
    main()
