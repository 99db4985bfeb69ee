import os

from openweights import OpenWeights

ow = OpenWeights()

# The tests swap in a tiny offline model: OW_COOKBOOK_MODEL=/path/to/model
MODEL = os.environ.get("OW_COOKBOOK_MODEL", "unsloth/Meta-Llama-3.1-8B")

training_file = ow.files.upload("preferences.jsonl", purpose="preference")["id"]
job = ow.fine_tuning.create(
    model=MODEL,
    training_file=training_file,
    loss="dpo",
    epochs=1,
    learning_rate=1e-5,
    beta=0.1,  # Controls the strength of the preference optimization
    # DPO needs the reference model's log-probs besides the policy's (with LoRA the
    # reference is the model with its adapter off) → mid-tier. requires_vram_gb=None lets
    # allowed_hardware be the sole GPU selector.
    requires_vram_gb=None,
    allowed_hardware=["1x A100", "1x A100S", "1x H100S", "1x H100N"],
)
print(job)
print(f"The model will be pushed to: {job.params['validated_params']['finetuned_model_id']}")
