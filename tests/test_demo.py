"""The README's first command: the demo runs end to end on the embedded default (no server, no GPU)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT, base_env


def test_readme_demo_fine_tunes_and_runs_inference_on_the_embedded_default(tmp_path):
    env = base_env(tmp_path / "home")
    env.update(OW_DEMO_DIR=str(tmp_path / "demo"), OMP_NUM_THREADS="2")
    try:
        out = subprocess.run(
            [sys.executable, "cookbook/demo.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        subprocess.run(["ow", "service", "stop"], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "'result': 14.0" in out.stdout  # the custom job
    loss = re.search(r"trained (\d+) steps: loss ([\d.]+) → ([\d.]+)", out.stdout)
    assert loss and int(loss[1]) > 0 and float(loss[3]) < float(loss[2]), out.stdout[-2000:]
    assert re.search(r"registered as \S+/\S+: Model\(", out.stdout)
    completions = re.findall(r"^  '.+' → '.*'$", out.stdout, flags=re.M)
    assert len(completions) == 4, out.stdout[-2000:]
