import os

from openweights import OpenWeights

ow = OpenWeights()

# The tests swap in a tiny offline model: OW_COOKBOOK_MODEL=/path/to/model
MODEL = os.environ.get("OW_COOKBOOK_MODEL", "unsloth/Qwen3-4B")

training_file = ow.files.upload("data/train.jsonl", purpose="conversations")["id"]

job = ow.fine_tuning.create(
    model=MODEL,
    training_file=training_file,
    loss="sft",
    epochs=1,
    learning_rate=1e-4,
    r=32,
)
print(job)
print(f"The model will be pushed to: {job.params['validated_params']['finetuned_model_id']}")
