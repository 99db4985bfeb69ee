import os
import time  # noqa: F401

import matplotlib.pyplot as plt  # noqa: F401
import pandas as pd  # noqa: F401
from logprob_tracking import plot_metrics, wait_for_completion
from pandas.api.types import is_numeric_dtype  # noqa: F401

from openweights import OpenWeights

ow = OpenWeights()

# The tests swap in a tiny offline model: OW_COOKBOOK_MODEL=/path/to/model
MODEL = os.environ.get("OW_COOKBOOK_MODEL", "unsloth/Qwen3-4B")


def submit_job():
    training_file = ow.files.upload(path="data/weighted_data.jsonl", purpose="conversations")["id"]
    logp_file = ow.files.upload(path="data/weighted_data_test.jsonl", purpose="conversations")["id"]
    job = ow.weighted_sft.create(
        model=MODEL,
        training_file=training_file,
        loss="sft",
        epochs=int(os.environ.get("OW_COOKBOOK_EPOCHS", 20)),  # the tests train less
        learning_rate=1e-4,
        r=32,
        eval_every_n_steps=1,
        logp_callback_datasets={"in-distribution": logp_file},
        requires_vram_gb=16,
    )
    return job


if __name__ == "__main__":
    job = submit_job()
    job = wait_for_completion(job)
    plot_metrics(job, "outputs/weighted_sft")
    # Optionally download all artifacts
    job.download("outputs/weighted_sft", only_last_run=False)
