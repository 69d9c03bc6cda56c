"""scripts/gpu_check.sh and its parts on a machine without a GPU: the check skips cleanly, and the training-step
script and the report writer run end to end on a small shape (their GPU numbers are in docs/benchmarks/kernels-gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped: " in done.stdout and "sees no CUDA device" in done.stdout
    assert not (tmp_path / "gpu_check.log").exists()  # nothing ran


def test_train_step_script_and_report_run_on_a_small_shape(tmp_path):
    out = tmp_path / "train_step.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_train_step.py"), "--shape", "tiny", "--device", "cpu",
                    "--groups", "2", "--generations", "2", "--prompt-len", "12", "--completion-len", "6", "--repeats", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    train = data["train"]
    assert set(train) >= {"reference pass", "preft-lora", "preft-lora-shared", "all-token-lora", "preft-loreft",
                          "preft-lora-1group", "preft-lora-1group-no-gc"}
    assert all(train[name]["seconds"] > 0 for name in ("preft-lora", "all-token-lora"))
    assert train["preft-lora-1group"]["tokens"] < train["preft-lora"]["tokens"]
    assert train["preft-lora"]["adapter_params"] == train["all-token-lora"]["adapter_params"] > 0
    report = tmp_path / "report.md"
    (tmp_path / "env.txt").write_text("cpu test")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_report.py"), str(tmp_path), str(report)], check=True, timeout=60)
    text = report.read_text()
    assert "| preft-lora-shared |" in text and "pytest.log is missing" in text and "kernels.json missing" in text
