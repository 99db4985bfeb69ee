import json
import os

from openweights import OpenWeights

ow = OpenWeights()

# OW_COOKBOOK_MODEL swaps in another model (the test suite uses a tiny local one).
model = os.environ.get("OW_COOKBOOK_MODEL", "unsloth/Qwen3-4B")

# Create an inference job
job = ow.inference.create(
    model=model,  # model can be one of: "hf-org/repo-with-model", "hf-org/repo-with-lora-adapter", "hf-orh/repo/path/to/checkpoint.ckpt", a local directory, or the finetuned_model_id of a fine-tune
    input_file_id=ow.files.upload("prompts.jsonl", purpose="conversations")["id"],
    max_tokens=int(os.environ.get("OW_COOKBOOK_MAX_TOKENS", 1000)),
    temperature=0.8,
    max_model_len=2048,
)
print(job)

# wait for completion (a long poll, no sleeping loop); raises if the job failed
job.wait(raise_on_failure=True)

# Get output
outputs_str = ow.files.content(job.outputs["file"]).decode("utf-8")
outputs = [json.loads(line) for line in outputs_str.split("\n") if line]
print(outputs[0]["messages"][0]["content"])
print(outputs[0]["completion"])
