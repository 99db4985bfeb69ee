"""An openweights SFT job vs a plain TRL script doing the same training, in one run.

Same tiny model (openweights.testing), same data, same LoRA and SFT settings, CPU float32. Reports
training throughput (input tokens / TRL's `train_runtime`), end-to-end wall time (plain: process
start → exit; openweights: `create` → the client sees `completed`, worker already running) and the
peak RSS of the training process in each case.

    python bench/bench_training.py [--rows 512] [--epochs 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import backend, base_env, machine, status_kb  # noqa: E402

SETTINGS = dict(
    epochs=2,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    learning_rate=5e-3,
    r=8,
    lora_alpha=16,
    warmup_steps=0,
    max_seq_length=128,
    save_steps=100_000,
    seed=3407,
)

PLAIN = textwrap.dedent(
    """
    import json, resource, sys, time
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir, data_path, out_dir, s = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    rows = [json.loads(l) for l in open(data_path)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=out_dir, num_train_epochs=s["epochs"], per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"], learning_rate=s["learning_rate"],
        warmup_steps=s["warmup_steps"], logging_steps=1, optim="adamw_torch", weight_decay=0.01,
        lr_scheduler_type="linear", seed=s["seed"], save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, include_num_input_tokens_seen=True, max_length=s["max_seq_length"],
        assistant_only_loss=True,
    )
    peft = LoraConfig(r=s["r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, use_rslora=True, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft)
    result = trainer.train()
    trainer.save_model(out_dir + "/adapter")
    print(json.dumps({"tokens": trainer.state.num_input_tokens_seen, "train_runtime": result.metrics["train_runtime"],
                      "train_loss": result.training_loss, "steps": result.global_step,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def plain_run(model: Path, data: Path, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, str(model), str(data), str(work), json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - t0
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(wall_s=round(wall, 2), tokens_per_s=round(r["tokens"] / r["train_runtime"], 1))
    return r


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PeakRSS:
    """The largest VmHWM among a process's descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for p in descendants(self.pid):
                self.peak_kb = max(self.peak_kb, status_kb(p, "VmHWM") or 0)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def openweights_run(ow, worker_pid: int, model: Path, data_id: str, i: int) -> dict:
    t0 = time.perf_counter()
    with PeakRSS(worker_pid) as rss:
        job = ow.fine_tuning.create(
            model=str(model),
            training_file=data_id,
            loss="sft",
            optim="adamw_torch",
            job_id_suffix=f"bench-{i}-{time.time()}",
            **SETTINGS,
        )
        job.wait(timeout=3600)
    wall = time.perf_counter() - t0
    assert job.status == "completed", job.error
    events = [e["data"] for e in ow.events.list(job_id=job.id)]
    final = next(e for e in reversed(events) if "train_runtime" in e)
    tokens = max((e.get("num_input_tokens_seen") or 0) for e in events)
    return {
        "tokens": tokens,
        "train_runtime": final["train_runtime"],
        "train_loss": final.get("train_loss"),
        "steps": final.get("step"),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / final["train_runtime"], 1),
        "peak_rss_mb": round(rss.peak_kb / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    SETTINGS["epochs"] = args.epochs
    from openweights import OpenWeights
    from openweights.testing import conversations_rows, make_tiny_model, write_jsonl

    results: dict = {"machine": machine(), "settings": SETTINGS, "rows": args.rows}
    with backend("sqlite") as b:
        model = make_tiny_model(b.workdir / "tiny")
        data = write_jsonl(b.workdir / "train.jsonl", conversations_rows(args.rows))
        srv = b.start_server("train")
        ow = OpenWeights(base_url=srv.url, api_key=srv.signup())
        data_id = ow.files.upload(str(data), purpose="conversations")["id"]
        wtoken = ow.tokens.create(name="bench", kind="worker").token
        env = base_env(srv.home / "worker-home")
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openweights.worker",
                "--url",
                srv.url,
                "--token",
                wtoken,
                "--any-hardware",
            ],
            env=env,
            stdout=open(srv.home / "worker.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        try:
            plain, ours = [], []
            for i in range(args.repeat):  # interleaved, so drift hits both alike
                plain.append(plain_run(model, data, b.workdir / f"plain-{i}"))
                ours.append(openweights_run(ow, worker.pid, model, data_id, i))
        finally:
            worker.terminate()
            worker.wait(60)
            srv.stop()
    results["plain"], results["openweights"] = plain, ours

    def best(rs: list[dict], key: str, fn=max) -> float:
        return fn(r[key] for r in rs)

    summary = {
        "plain_tokens_per_s": best(plain, "tokens_per_s"),
        "openweights_tokens_per_s": best(ours, "tokens_per_s"),
        "plain_wall_s": best(plain, "wall_s", min),
        "openweights_wall_s": best(ours, "wall_s", min),
        "plain_peak_rss_mb": best(plain, "peak_rss_mb"),
        "openweights_peak_rss_mb": best(ours, "peak_rss_mb"),
    }
    summary["throughput_ratio"] = round(
        summary["openweights_tokens_per_s"] / summary["plain_tokens_per_s"], 3
    )
    summary["wall_overhead_s"] = round(summary["openweights_wall_s"] - summary["plain_wall_s"], 2)
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "training.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
