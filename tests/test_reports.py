"""`preft-rl report`: the training report from a real trainer log."""

from __future__ import annotations

import json

import pytest

from preft_rl.cli import main


def write_log(path, steps=4):
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "reward": 0.1 * step, "rewards/gsm8k_accuracy_reward/mean": 0.05 * step,
                     "completions/mean_length": 100.0, "kl": 0.0, "entropy": 1.5, "rollout/tokens_per_s": 90.0 + step,
                     "time/generate": 2.0, "time/score": 0.1, "time/logprobs": 0.0, "time/backward": 3.0, "time/sync": 0.02,
                     "time/step": 5.12})
    rows.append({"step": steps, "eval/reward": 0.3, "eval/rewards/gsm8k_accuracy_reward/mean": 0.3})
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_writes_markdown_and_plots(tmp_path, capsys):
    write_log(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| reward | 0.1 | 0.4 | 0.25 |" in report
    assert "| rewards/gsm8k_accuracy_reward/mean | 0.05 | 0.2 |" in report
    assert "| backward | 3.000 | 58.6% |" in report
    assert "| eval/reward | 0.3 | 0.3 | |" in report
    for name in ("reward.png", "throughput.png", "timing.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_report_on_a_missing_log_says_what_to_pass(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "pass the output_dir of a PreftGRPOTrainer run" in capsys.readouterr().err


def test_rollout_benchmark_bookkeeping(tiny_llama_dir, tmp_path):
    """Every configuration runs, the counts add up and the files are written (speed is not tested)."""
    import pytest

    pytest.importorskip("vllm")
    from preft_rl.reports.rollout import RolloutBenchConfig, run, write_report

    cfg = RolloutBenchConfig(model=str(tiny_llama_dir), adapters=[1, 3], methods=["lora", "loreft"], rank=4, prompts=[2, 4],
                             prompt_len=16, gen_len=4, repeats=2, out=str(tmp_path), max_num_batched_tokens=256)
    assert cfg.max_num_seqs == 4  # default: the largest point of the sweep runs all at once
    result = run(cfg, progress=False)
    measurements = result["measurements"]
    # repeats x sweep points x (base + adapter counts x (2 PreFT methods + the same on all tokens in our engine +
    # vLLM's all-token LoRA))
    assert len(measurements) == 2 * 2 * (1 + 2 * 5)
    for m in measurements:
        s = m["sequences"]
        assert m["output_tokens"] == s * 4 and m["prompt_tokens"] == s * 16
        # 4 tokens: one prefill step (all prompts fit in 256 tokens), then 3 pure-decode steps of s tokens each
        assert (m["prefill_steps"], m["decode_steps"], m["decode_tokens"]) == (1, 3, 3 * s)
        assert m["prefill_s"] + m["decode_s"] <= m["seconds"]
    summary = {(r["config"], r["adapters"], r["sequences"]): r for r in result["summary"]}
    configs = ("preft-lora", "preft-loreft", "all-lora", "all-loreft", "lora-all-token")
    assert set(summary) == {("base", 0, s) for s in (2, 4)} | {(c, n, s) for n in (1, 3) for c in configs for s in (2, 4)}
    assert all(summary[("base", 0, s)]["vs_base"] == summary[("base", 0, s)]["decode_vs_base"] == 1.0 for s in (2, 4))
    assert summary[("lora-all-token", 3, 4)]["vs_lora_all_token"] == 1.0
    assert all(r["vs_base"] > 0 and r["decode_vs_base"] > 0 for r in summary.values())  # the ratios: by hand below
    paths = write_report(result, tmp_path, "preft-rl bench rollout (test)")
    assert json.loads(paths["json"].read_text())["command"] == "preft-rl bench rollout (test)"
    assert paths["markdown"].read_text().count("\n| ") == 2 + 22  # header, separator, 11 configurations x 2 points
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_rollout_summary_and_report_without_the_all_token_baseline(tmp_path):
    from dataclasses import asdict

    from preft_rl.reports.rollout import Measurement, RolloutBenchConfig, summarize, write_report

    ms = [Measurement("base", 0, 2.0, 100, 50, 0.5, 1.5, 1, 9), Measurement("base", 0, 4.0, 100, 50, 0.5, 3.5, 1, 9),
          Measurement("preft-lora", 8, 2.5, 100, 50, 1.0, 1.5, 1, 9)]
    rows = {(r["config"], r["adapters"]): r for r in summarize(ms)}
    assert rows[("base", 0)]["output_tok_s"] == 37.5 and rows[("base", 0)]["runs"] == 2  # median of 50 and 25
    assert rows[("preft-lora", 8)]["vs_base"] == 40.0 / 37.5
    assert rows[("preft-lora", 8)]["vs_lora_all_token"] is None
    cfg = RolloutBenchConfig(adapters=[8], methods=["lora"], all_token=False)
    paths = write_report({"config": asdict(cfg), "measurements": [asdict(m) for m in ms], "summary": summarize(ms)}, tmp_path, "x")
    assert "| preft-lora | 8 |" in paths["markdown"].read_text()


def test_rollout_ratios_by_hand():
    """Throughput and its ratios on numbers worked out by hand (not by the implementation's own formula):
    output tokens / wall seconds per run, the median over runs, then each configuration against base and against
    all-token LoRA at the same adapter count."""
    from preft_rl.reports.rollout import Measurement, summarize

    ms = [  # (config, adapters, seconds, output tokens, prompt tokens, ...)
        Measurement("base", 0, 2.0, 100, 50, 0.5, 1.5, 1, 9),  # 50 tok/s
        Measurement("base", 0, 1.0, 100, 50, 0.5, 0.5, 1, 9),  # 100 tok/s
        Measurement("base", 0, 4.0, 100, 50, 0.5, 3.5, 1, 9),  # 25 tok/s -> median 50
        Measurement("preft-lora", 8, 2.0, 100, 50, 1.0, 1.0, 1, 9),  # 50
        Measurement("preft-lora", 8, 8.0, 100, 50, 1.0, 7.0, 1, 9),  # 12.5 -> median of two: 31.25
        Measurement("lora-all-token", 8, 10.0, 100, 50, 2.0, 8.0, 1, 9),  # 10
        Measurement("all-lora", 8, 4.0, 100, 50, 1.0, 3.0, 1, 9),  # 25: our engine, the same adapters on every token
    ]
    rows = {(r["config"], r["adapters"]): r for r in summarize(ms)}
    assert rows[("base", 0)]["output_tok_s"] == 50.0 and rows[("base", 0)]["runs"] == 3
    assert rows[("base", 0)]["total_tok_s"] == 75.0  # (100 + 50) / 2
    assert rows[("preft-lora", 8)]["output_tok_s"] == 31.25
    assert rows[("preft-lora", 8)]["vs_base"] == 0.625
    assert rows[("preft-lora", 8)]["vs_lora_all_token"] == 3.125
    assert rows[("lora-all-token", 8)]["vs_base"] == 0.2 and rows[("lora-all-token", 8)]["vs_lora_all_token"] == 1.0
    assert rows[("preft-lora", 8)]["vs_ours_all_token"] == 1.25  # 31.25 / 25
    assert rows[("all-lora", 8)]["vs_ours_all_token"] is None and rows[("base", 0)]["vs_ours_all_token"] is None


def test_rollout_batch_sweep_ratios_by_hand():
    """With several request counts, every ratio compares runs of the same count; pure-decode tokens/s is the tokens of
    the pure-decode steps over those steps' seconds."""
    from preft_rl.reports.rollout import Measurement, summarize

    # (config, adapters, seconds, output tokens, prompt tokens, prefill s, decode s, prefill steps, decode steps,
    #  sequences, decode tokens)
    ms = [
        Measurement("base", 0, 2.0, 64, 64, 0.5, 1.5, 1, 7, 8, 56),  # decode 56 / 1.5
        Measurement("preft-lora", 8, 2.5, 64, 64, 1.0, 1.5, 1, 7, 8, 56),  # the same decode rate: 1.0
        Measurement("base", 0, 4.0, 512, 512, 1.0, 3.0, 1, 7, 64, 448),  # decode 448 / 3 = 149.33
        Measurement("preft-lora", 8, 5.0, 512, 512, 1.8, 3.2, 1, 7, 64, 448),  # decode 448 / 3.2 = 140
    ]
    rows = {(r["config"], r["sequences"]): r for r in summarize(ms)}
    assert rows[("base", 8)]["decode_tok_s"] == pytest.approx(56 / 1.5)
    assert rows[("preft-lora", 8)]["decode_vs_base"] == pytest.approx(1.0)
    assert rows[("preft-lora", 8)]["vs_base"] == pytest.approx(0.8)  # 25.6 vs 32 output tok/s
    assert rows[("preft-lora", 64)]["decode_vs_base"] == pytest.approx(3.0 / 3.2)
    assert rows[("preft-lora", 64)]["vs_base"] == pytest.approx(0.8)  # 102.4 vs 128
    assert [r["sequences"] for r in summarize(ms)] == [8, 8, 64, 64]


def test_serve_benchmark_statistics_by_hand():
    """Serving metrics on numbers worked out by hand: TTFT / TPOT percentiles (linear between order statistics),
    requests/s and output tokens/s over the run's wall time, medians over runs, and the ratios."""
    from preft_rl.reports.serve import RequestTiming, summarize, summarize_run

    timings = [RequestTiming(0.1, 0.01, 10), RequestTiming(0.2, 0.02, 10), RequestTiming(0.3, 0.03, 10),
               RequestTiming(0.5, None, 1)]  # a one-token answer has no TPOT
    run = summarize_run(timings, seconds=2.0)
    assert run["requests_s"] == 2.0 and run["output_tok_s"] == 15.5  # 31 tokens / 2 s
    assert run["ttft_p50_ms"] == pytest.approx(250.0)  # between 0.2 and 0.3
    assert run["ttft_p99_ms"] == pytest.approx(494.0)  # 0.3 + 0.99 * 3 - 2 = 0.97 of the way from 0.3 to 0.5
    assert run["tpot_p50_ms"] == pytest.approx(20.0) and run["tpot_p99_ms"] == pytest.approx(29.8)
    keys = ("requests_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    row = lambda server, tok_s: {"server": server, "output_tok_s": tok_s, **{k: 1.0 for k in keys}}  # noqa: E731
    rows = {r["server"]: r for r in summarize([row("base", 100.0), row("base", 120.0), row("base", 80.0),
                                               row("preft-lora", 90.0), row("all-lora", 60.0), row("vllm-lora", 30.0)])}
    assert rows["base"]["output_tok_s"] == 100.0 and rows["base"]["runs"] == 3
    assert (rows["base"]["output_tok_s_min"], rows["base"]["output_tok_s_max"]) == (80.0, 120.0)
    assert rows["preft-lora"]["vs_base"] == 0.9 and rows["preft-lora"]["vs_vllm_lora"] == 3.0
    assert rows["preft-lora"]["vs_all_lora"] == 1.5 and rows["all-lora"]["vs_all_lora"] is None
    assert [r["server"] for r in summarize([row("vllm-lora", 1.0), row("base", 1.0)])] == ["base", "vllm-lora"]
