"""`preft-rl report`: the training report from a real trainer log."""

from __future__ import annotations

import json

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
