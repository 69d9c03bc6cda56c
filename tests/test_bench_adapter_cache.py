"""`preft-rl bench adapter-cache`: the traffic, the checks of its flags, and one small run on the tiny Llama in which the
cache servers (ours and vLLM's resolver) serve every request and count their loads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from preft_rl.reports.adapter_cache import AdapterCacheBenchConfig, zipf_traffic

REPO = Path(__file__).resolve().parents[1]


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--servers"):
        AdapterCacheBenchConfig(servers=["sglang"])
    with pytest.raises(ValueError, match="--cpu-adapters 8 must be >= --slots 64"):
        AdapterCacheBenchConfig(cpu_adapters=8)
    with pytest.raises(ValueError, match="--zipf 0"):
        AdapterCacheBenchConfig(zipf=0)
    with pytest.raises(ValueError, match="--requests 0"):
        AdapterCacheBenchConfig(requests=0)


def test_zipf_traffic_has_the_law_and_the_seed():
    """The most used adapter takes about 1/H(N) of the requests (H: the harmonic number), names are in no popularity
    order, and the same seed draws the same traffic."""
    cfg = AdapterCacheBenchConfig(adapters=1000, requests=20_000)
    traffic = zipf_traffic(cfg)
    counts = Counter(traffic).most_common()
    harmonic = sum(1 / k for k in range(1, 1001))
    assert abs(counts[0][1] / 20_000 - 1 / harmonic) < 0.01  # 0.134; the binomial sd is 0.0024
    assert abs(counts[1][1] / counts[0][1] - 0.5) < 0.1
    assert counts[0][0] != "user-00000" and zipf_traffic(cfg) == traffic
    assert zipf_traffic(AdapterCacheBenchConfig(adapters=1000, requests=20_000, seed=1)) != traffic


@pytest.mark.slow
def test_bench_adapter_cache_serves_every_request_from_disk(tiny_llama_dir, tmp_path):
    command = [sys.executable, "-m", "preft_rl.cli", "bench", "adapter-cache", "--model", str(tiny_llama_dir), "--adapters", "40",
               "--slots", "2", "--cpu-adapters", "4", "--requests", "24", "--clients", "4", "--rank", "1", "--prompt-len", "8",
               "--gen-len", "4", "--servers", "preft,vllm-lora", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "adapter-cache.json").read_text())
    runs = {r["server"]: r for r in result["runs"]}
    assert set(runs) == {"preft", "vllm-lora"} and not any("failed" in r for r in runs.values()), result["runs"]
    assert all(r["requests"] == 24 and r["output_tok_s"] > 0 for r in runs.values())
    distinct = result["distinct_adapters"]
    assert runs["preft"]["first_requests"] == distinct > 4  # more adapters than the 4 held: some were unloaded
    cache = runs["preft"]["cache"]
    assert cache["dir_loads_during"] >= distinct and cache["dir_unloads_during"] >= distinct - 4 and cache["registered"] <= 4
    assert runs["preft"]["vs_vllm_lora"] > 0
    assert "| preft |" in (tmp_path / "out" / "adapter-cache.md").read_text()
