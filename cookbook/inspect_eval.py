import os

from openweights import OpenWeights

ow = OpenWeights()

# OW_COOKBOOK_* swap in another model and eval (the test suite uses a tiny local model and a
# small task file that needs no network).
job = ow.inspect_ai.create(
    model=os.environ.get("OW_COOKBOOK_MODEL", "meta-llama/Llama-3.3-70B-Instruct"),
    eval_name=os.environ.get("OW_COOKBOOK_EVAL", "inspect_evals/gpqa_diamond"),
    options=os.environ.get(
        "OW_COOKBOOK_OPTIONS", "--top-p 0.9"
    ),  # Can be any options that `inspect eval` accepts - we simply pass them on without validation
)

job.wait()  # a long poll until the job ends
if job.status == "completed":
    job.download("output")
    print(job.outputs["results"])
else:
    print(job)
