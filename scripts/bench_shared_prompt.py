"""Training forward+backward with and without sharing each group's prompt (SmolLM2, PreFT LoRA r=16, fp32, CPU).

    .venv/bin/python scripts/bench_shared_prompt.py [--groups 2] [--generations 4] [--completion 128] [--repeats 5]

A micro-batch as the GRPO main job has it: real GSM8K prompts of the default training prompt (load_gsm8k, with its
worked example), `--generations` completions of `--completion` random tokens each, right-padded as the trainer packs
rollouts. Both forms run alternately; printed: the median time of each, their ratio, the tokens the linear layers see,
and the largest difference of the completion log-probs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preft_rl import PreftConfig, get_preft_model
from preft_rl.data import load_gsm8k
from preft_rl.engine.engine import prompt_token_ids
from preft_rl.models import resolve_model
from preft_rl.trainers.grpo_core import selective_log_softmax

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_preft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), PreftConfig(method="lora", r=16, seed=0))
    source = SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto"
    prompts = [prompt_token_ids(tokenizer, row["prompt"]) for row in load_gsm8k("train", source=source, num_examples=args.groups)]
    rows = [(p, torch.randint(0, 49000, (args.completion,)).tolist()) for p in prompts for _ in range(args.generations)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am, pm, cm = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(rows):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        am[b, : len(p) + len(c)], pm[b, : len(p)], cm[b, len(p) : len(p) + len(c)] = 1, True, True
    first = int(pm.sum(-1).min()) - 1
    keep = width - first

    def step(share: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep, share_prompts=share).logits
        logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1 :]) * cm[:, first + 1 :]
        logps.sum().backward()
        return time.perf_counter() - start, logps.detach()

    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)  # warm-up
    for _ in range(args.repeats):
        for share in (False, True):
            times[share].append(step(share)[0])
    gap = (step(True)[1] - step(False)[1]).abs().max().item()
    median = {share: sorted(t)[len(t) // 2] for share, t in times.items()}
    prompt_len = sum(map(len, prompts)) / len(prompts)
    plain_tokens = sum(len(p) + len(c) for p, c in rows)
    shared_tokens = sum(map(len, prompts)) + sum(len(c) for _, c in rows)
    print(f"{args.groups} groups x {args.generations} completions, prompt {prompt_len:.0f} tokens (mean), completion {args.completion}")
    print(f"forward+backward: plain {median[False]:.2f} s, shared prompt {median[True]:.2f} s, ratio {median[True] / median[False]:.2f} "
          f"(tokens through the linear layers: {plain_tokens} -> {shared_tokens}, {shared_tokens / plain_tokens:.2f}x); "
          f"max |log-prob difference| {gap:.1e}")


if __name__ == "__main__":
    main()
