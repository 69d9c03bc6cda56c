"""The trainer under `accelerate launch` with DeepSpeed ZeRO-2 / ZeRO-3, and in two CPU processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("vllm")

from test_multitenant import TRAJECTORY_ATOL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("distributed_train_check.py")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    env.update(extra_env or {})
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


@pytest.fixture(scope="module")
def plain_run(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    stdout = run([sys.executable, str(SCRIPT), str(tiny_llama_dir), str(out)])
    assert "RANK 0 OF 1 PreftModel" in stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_a_plain_run(tiny_llama_dir, tmp_path, plain_run, stage):
    config = REPO / "examples" / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"
    stdout = run([str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
                  str(SCRIPT), str(tiny_llama_dir), str(tmp_path)])
    assert "DeepSpeedEngine" in stdout
    assert ("ZERO3 UNGATHERED STATE REFUSED" in stdout) == (stage == 3)
    ours, plain = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(plain_run / "adapter_model.safetensors"))
    assert set(ours) == set(plain)
    for key in plain:
        if stage == 2:  # same arithmetic as the plain run
            assert torch.equal(ours[key], plain[key]), key
        else:  # partitioned parameters reduce in another order: measured max difference 5e-5
            torch.testing.assert_close(ours[key], plain[key], atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def two_process_ddp_run(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tiny_llama_dir), str(out)], {"ACCELERATE_USE_CPU": "true"})
    digests = dict(re.findall(r"RANK (\d) OF 2 DistributedDataParallel ADAPTER ([0-9a-f]{16})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    return out


@pytest.mark.slow
def test_two_cpu_processes_each_with_an_engine_stay_in_sync(two_process_ddp_run):
    log = (two_process_ddp_run / "log.jsonl").read_text().splitlines()
    assert len(log) == 3


@pytest.mark.slow
def test_two_processes_with_tools_stay_in_step_while_their_trajectories_end_at_different_rounds(tool_model_dir, tmp_path):
    """Multi-turn GRPO with tools in two DDP processes (torchrun + gloo, an engine each): every engine round is taken by
    both processes until neither has a trajectory running, so a process whose trajectories ended early keeps stepping
    with the other (no hang); tool calls are logged over both, and the ranks train the same adapter."""
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tool_model_dir), str(tmp_path)], {"ACCELERATE_USE_CPU": "true", "PREFT_CHECK_TOOLS": "1"})
    digests = dict(re.findall(r"RANK (\d) OF 2 DistributedDataParallel ADAPTER ([0-9a-f]{16})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and sum(entry["tools/calls"] for entry in logs) >= 1
    assert any(1.0 < entry["tools/turns"] < 3.0 for entry in logs)  # some trajectories took more turns than others


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["", "disk"])
def test_two_process_ddp_tenants_each_equal_their_own_ddp_run(tiny_llama_dir, tmp_path, two_process_ddp_run, offload):
    """Two DDP processes, three tenants, two per step, one tenant's rows per forward: tenant t0 has the plain run's
    data, reward and settings and trains at 3 of the 4 steps, so its adapter equals the 3-step two-process plain run's
    (a tenant's rows are split over processes as its own run splits them; DDP reduces each micro-batch's pieces once,
    with a zero-weight term for every adapter not in the last piece, and a tenant not picked gets no step); the ranks
    agree. The same with tenant_offload='disk' (each process its own store; the model holds two rows)."""
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tiny_llama_dir), str(tmp_path)], {"ACCELERATE_USE_CPU": "true", "PREFT_CHECK_TENANTS": "3",
                                                        "PREFT_CHECK_TENANT_OFFLOAD": offload})
    digests = dict(re.findall(r"RANK (\d) OF 2 DistributedDataParallel ADAPTER ([0-9a-f]{16})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    ours = load_file(str(tmp_path / "tenants" / "t0" / "adapter_model.safetensors"))
    alone = load_file(str(two_process_ddp_run / "adapter_model.safetensors"))
    assert ours.keys() == alone.keys()
    for key in alone:  # fp32 rounding of other GEMM shapes, grown by AdamW: see test_multitenant.TRAJECTORY_ATOL
        torch.testing.assert_close(ours[key], alone[key], atol=TRAJECTORY_ATOL, rtol=0)
    for name in ("t1", "t2"):  # trained their own way
        other = load_file(str(tmp_path / "tenants" / name / "adapter_model.safetensors"))
        assert max((other[k] - alone[k]).abs().max().item() for k in alone) > 10 * TRAJECTORY_ATOL, name
    if offload:
        assert sorted(p.name for p in (tmp_path / "tenant_state").iterdir()) == ["process-0", "process-1"]


def launch_tenants(tiny_llama_dir: Path, out: Path, extra_env: dict[str, str]) -> str:
    """Two torchrun processes training tenants t0 and t1 with clipping off; the ranks must agree."""
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tiny_llama_dir), str(out)], {"PREFT_CHECK_TENANTS": "1", "PREFT_CHECK_MAX_GRAD_NORM": "0", **extra_env})
    digests = dict(re.findall(r"RANK (\d) OF 2 \w+ ADAPTER ([0-9a-f]{16})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    return stdout


@pytest.mark.slow
def test_two_process_zero2_tenants_equal_ddp_tenants(tiny_llama_dir, tmp_path):
    """ZeRO-2 with tenants (clipping off, every tenant every step: what DeepSpeed allows) trains each tenant's adapter
    as two-process DDP does; a ZeRO-2 run with clipping on is refused before the model loads."""
    ddp = launch_tenants(tiny_llama_dir, tmp_path / "ddp", {"ACCELERATE_USE_CPU": "true"})
    zero2 = launch_tenants(tiny_llama_dir, tmp_path / "zero2", {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "examples" / "accelerate_configs" / "ds_zero2.json")})
    assert "DistributedDataParallel ADAPTER" in ddp and "DeepSpeedEngine ADAPTER" in zero2
    for name in ("t0", "t1"):
        ours = load_file(str(tmp_path / "zero2" / "tenants" / name / "adapter_model.safetensors"))
        reference = load_file(str(tmp_path / "ddp" / "tenants" / name / "adapter_model.safetensors"))
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], atol=1e-4, rtol=0)
    t0 = load_file(str(tmp_path / "zero2" / "tenants" / "t0" / "adapter_model.safetensors"))
    t1 = load_file(str(tmp_path / "zero2" / "tenants" / "t1" / "adapter_model.safetensors"))
    assert max((t0[k] - t1[k]).abs().max().item() for k in t0) > 1e-3
    refused = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port()), str(SCRIPT), str(tiny_llama_dir),
         str(tmp_path / "clipped")], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PREFT_CHECK_TENANTS": "1", "ACCELERATE_USE_DEEPSPEED": "true",
             "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "examples" / "accelerate_configs" / "ds_zero2.json")})
    assert refused.returncode != 0 and "needs gradient clipping off (gradient_clipping=1.0)" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "clipped").exists()  # refused before anything was written


@pytest.mark.slow
def test_two_process_zero2_under_torchrun_matches_ddp(tiny_llama_dir, tmp_path, two_process_ddp_run):
    """torchrun + gloo, two processes, each with its own engine: DeepSpeed ZeRO-2 finishes its steps, the
    ranks agree, and the adapter matches two-process DDP (measured max difference 2.8e-6 after 3 steps)."""
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tiny_llama_dir), str(tmp_path)],
                 {"ACCELERATE_USE_DEEPSPEED": "true",
                  "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "examples" / "accelerate_configs" / "ds_zero2.json")})
    assert "2 process(es) x 4 completions" in stdout
    digests = dict(re.findall(r"RANK (\d) OF 2 DeepSpeedEngine ADAPTER ([0-9a-f]{16})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    ddp = load_file(str(two_process_ddp_run / "adapter_model.safetensors"))
    for key in ddp:
        torch.testing.assert_close(ours[key], ddp[key], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_bit_identical(tiny_llama_dir, tmp_path, stage):
    import shutil

    config = REPO / "examples" / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"

    def launch(out: Path, *extra: str) -> str:
        stdout = run([str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
                      str(SCRIPT), str(tiny_llama_dir), str(out), "4", "2", *extra])
        return re.search(r"ADAPTER ([0-9a-f]{16})", stdout).group(1)

    straight = launch(tmp_path / "straight")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert (tmp_path / "resumed" / "checkpoint-2" / "deepspeed").is_dir()  # DeepSpeed's sharded optimizer state
    assert launch(tmp_path / "resumed", "resume") == straight



@pytest.mark.slow
def test_ppo_two_process_zero2_matches_ddp(tiny_llama_dir, tmp_path):
    """PPO in two processes (torchrun + gloo, an engine in each): DeepSpeed ZeRO-2 over policy, critic and value head
    agrees across ranks and with two-process DDP."""
    def launch(out: Path, env: dict[str, str]) -> str:
        return run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                    str(tiny_llama_dir), str(out)], {"PREFT_CHECK_ALGO": "ppo", **env})

    ddp = launch(tmp_path / "ddp", {"ACCELERATE_USE_CPU": "true"})
    zero2 = launch(tmp_path / "zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE":
                                        str(REPO / "examples" / "accelerate_configs" / "ds_zero2.json")})
    for stdout, wrapper in ((ddp, "DistributedDataParallel"), (zero2, "DeepSpeedEngine")):
        digests = dict(re.findall(rf"RANK (\d) OF 2 {wrapper} ADAPTER ([0-9a-f]{{16}})", stdout))
        assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    for name in ("adapter_model.safetensors", "critic_final.safetensors"):  # policy; critic adapter and value head
        ours, theirs = load_file(str(tmp_path / "zero2" / name)), load_file(str(tmp_path / "ddp" / name))
        assert set(ours) == set(theirs) and len(ours) > 2
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_ppo_deepspeed_zero3_matches_a_plain_run(tiny_llama_dir, tmp_path):
    """ZeRO-3 partitions the policy adapter, the critic adapter and the value head of the one shared-base module; the
    engine sync gathers the policy only. The result matches a plain PPO run (partitioned reductions: small differences)."""
    ppo = {"PREFT_CHECK_ALGO": "ppo"}
    run([sys.executable, str(SCRIPT), str(tiny_llama_dir), str(tmp_path / "plain")], ppo)
    config = REPO / "examples" / "accelerate_configs" / "deepspeed_zero3.yaml"
    stdout = run([str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
                  str(SCRIPT), str(tiny_llama_dir), str(tmp_path / "zero3")], ppo)
    assert "DeepSpeedEngine" in stdout and "ZERO3 UNGATHERED STATE REFUSED" in stdout
    for name in ("adapter_model.safetensors", "critic_final.safetensors"):
        ours, plain = load_file(str(tmp_path / "zero3" / name)), load_file(str(tmp_path / "plain" / name))
        assert set(ours) == set(plain) and len(ours) > 2
        for key in plain:
            torch.testing.assert_close(ours[key], plain[key], atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_processes_with_one_tp2_engine_train_the_same_adapter_as_two_engines(tiny_llama_dir, tmp_path, two_process_ddp_run, backend):
    """Colocated engine TP (as TRL's vllm_tensor_parallel_size): the two processes form one TP group, gather their
    prompts, generate them together with the adapter sharded over both, and each keeps its slice. Per-request seeds
    make the samples those of two TP=1 engines, so the trained adapter is the same up to the TP all-reduce's rounding
    (and ZeRO-3's reduction order), with DDP and with DeepSpeed ZeRO-3 alike."""
    env = {"PREFT_CHECK_ENGINE_TP": "2"}
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        env.update(ACCELERATE_USE_DEEPSPEED="true",
                   ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "examples" / "accelerate_configs" / "ds_zero3.json"))
    stdout = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
                  str(tiny_llama_dir), str(tmp_path)], env)
    wrapper = "DeepSpeedEngine" if backend == "zero3" else "DistributedDataParallel"
    digests = dict(re.findall(rf"RANK (\d) OF 2 {wrapper} ADAPTER ([0-9a-f]{{16}})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout[-2000:]
    assert stdout.count("ENGINE TP 2") == 2  # both processes ran one sharded engine
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    reference = load_file(str(two_process_ddp_run / "adapter_model.safetensors"))
    assert set(ours) == set(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-3 if backend == "zero3" else 1e-4, rtol=0)
