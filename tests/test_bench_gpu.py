"""`bench/gpu.sh --smoke`: the GPU script's whole path, on the CPU with a 64-dim random model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_part_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_BENCH_OUT": str(tmp_path)}  # the shared cache: the embedded model is converted once
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert doc["model"]["name"] == "random-tiny" and doc["machine"]["cores"] and doc["commit"]
    for count in (200, 1000):
        row = doc["query_latency_recipe"][str(count)]
        assert row["stored"] == count
        searched, exact = row["searched"], row["exact_prompt"]
        assert searched["unedited"]["fired_share"] == 0 and exact[f"recipe@{count}"]["fired_share"] == 1
        assert searched[f"recipe@{count}"]["median_ms"] > 0
    assert doc["query_latency_scen"]["scen@50"]["median_ms"] > 0
    chat = doc["chat_batch"]
    assert chat["unedited"]["batch"] == 4 and chat["recipe"]["tokens"] > 0 and chat["recipe"]["fired"] > 0
    for name in ("recipe", "scen", "rome", "memit", "rledit"):
        costs = doc["edit_costs"][name]
        assert costs["compute_s_median"] > 0 and costs["apply"]["median_ms"] > 0, (name, costs)
        assert costs["batch"] == (4 if name in ("memit", "rledit") else 1), (name, costs)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the script's refusal without CUDA can only be seen on a machine without CUDA"
)
def test_the_gpu_script_refuses_to_run_the_full_bench_without_cuda(tmp_path):
    env = {**os.environ, "GPU_BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no CUDA device here" in proc.stderr
