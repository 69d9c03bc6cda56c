"""How close the trainer's forward/backward on CPU is to the machine's matmul speed (SmolLM2, PreFT LoRA r=16, fp32).

    .venv/bin/python scripts/profile_trainer_forward.py

Prints the median time of a no-grad forward and of a forward+backward over 4 sequences of 150 prompt + 128
completion tokens, the effective GFLOP/s (2 x params x tokens per forward; the backward computes input
gradients only, since the base is frozen, so about one more forward), a bare matmul of one MLP shape for
scale, and the top ops of one forward+backward.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from preft_rl import PreftConfig, get_preft_model
from preft_rl.models import resolve_model

B, PROMPT, COMPLETION = 4, 150, 128


def main() -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32)
    model = get_preft_model(base, PreftConfig(method="lora", r=16))
    ids = torch.randint(0, 49000, (B, PROMPT + COMPLETION))
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :PROMPT] = True
    params = sum(p.numel() for p in base.parameters())
    embedding = base.get_input_embeddings().weight.numel()
    forward_flops = (params - embedding) * 2 * B * (PROMPT + COMPLETION) + embedding * 2 * B * (COMPLETION + 1)

    def step(grad: bool) -> float:
        start = time.perf_counter()
        with torch.enable_grad() if grad else torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_mask=prompt_mask,
                           logits_to_keep=COMPLETION + 1).logits
            if grad:
                logits.float().logsumexp(-1).mean().backward()
        return time.perf_counter() - start

    for grad in (False, True):
        step(grad)
        median = sorted(step(grad) for _ in range(3))[1]
        print(f"{'forward+backward' if grad else 'forward'}: {median:.2f} s, "
              f"~{forward_flops * (2 if grad else 1) / median / 1e9:.0f} GFLOP/s")
    x, w = torch.randn(B * (PROMPT + COMPLETION), 576), torch.randn(1536, 576)
    start = time.perf_counter()
    for _ in range(50):
        x @ w.T
    print(f"bare matmul {tuple(x.shape)} x {tuple(w.T.shape)}: {2 * x.numel() * 1536 * 50 / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s")
    with torch.profiler.profile() as prof:
        step(True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
