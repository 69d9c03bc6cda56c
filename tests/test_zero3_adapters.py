"""Every adapter method under DeepSpeed ZeRO-3 with every parameter partitioned: the adapter modules read their
sub-modules' weights directly (one fused op), so the trainer registers those weights with the module that reads them
(runtime.register_zero3_adapter_parameters). Loss and adapter gradients equal a plain run's. The end-to-end PPO run
under ZeRO-3 (test_grpo_distributed.py), where the policy is called inside the wrapped actor-critic, failed without
the registration ("vec (0)": an unfetched LoRA A shard)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).with_name("zero3_adapter_check.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["lora", "loreft", "direft"])
def test_zero3_adapter_step_equals_a_plain_step(tiny_llama_dir, method):
    env = {**os.environ, "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_llama_dir), method], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "ERROR" not in out.stdout, out.stdout
    registered = int(re.search(r"REGISTERED (\d+)", out.stdout).group(1))
    assert registered == {"lora": 28, "loreft": 6, "direft": 6}[method]  # 7 linear layers x 2 layers x (A, B); 2 layers x 3
    loss_diff = float(re.search(r"MAX_LOSS_DIFF (\S+)", out.stdout).group(1))
    grad_diff = float(re.search(r"MAX_GRAD_DIFF (\S+)", out.stdout).group(1))
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6, out.stdout
