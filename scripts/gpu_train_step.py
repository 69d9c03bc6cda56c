"""The trainer's forward+backward on an 8B-shaped random Llama: time and peak memory, side by side.

    python3 scripts/gpu_train_step.py --json train_step.json            # Llama-3-8B shape, bf16, on CUDA
    python3 scripts/gpu_train_step.py --shape tiny --device cpu         # the same code on a small shape (smoke test)

One micro-batch as GRPO packs it: `--groups` prompts of `--prompt-len` random tokens, each with `--generations`
completions of `--completion-len` tokens, right-padded rows `[prompt | completion]`. Every variant runs the
trainer's own loss path (PreftModel forward with `logits_to_keep`, `selective_log_softmax` on the completion
tokens, backward into the adapter only), with gradient checkpointing unless named otherwise:

    reference pass     base model, adapter off, no grad (the KL reference / old log-prob pass)
    preft-lora         PreFT LoRA r=16 on every linear layer, adapter at prompt tokens only
    *-torch-path       the same with the adapter arithmetic in plain torch, not the Triton prefill kernels
    preft-lora-shared  the same with share_prompts=True (each group's prompt computed once)
    all-token-lora     the same adapter at every token (adapter_scope="all"), the paper's baseline
    preft-loreft       PreFT LoReFT r=16 at every layer, positions f7+l7
    preft-lora-1group  PreFT LoRA on one group only (half the batch), with and without gradient checkpointing
                       (activation memory for the planner; the whole batch without checkpointing does not fit)

Timed: the median of `--repeats` steps after one warm-up, all variants in one process on one base model
(adapters are swapped with PreftModel.unload). Peak memory: torch.cuda.max_memory_allocated per variant.
Also timed: one LoRA layer (the gate/up projection at this shape) fwd+bwd at the prompt rows, the torch
path the trainer uses today against the Triton prefill kernels (preft_rl.kernels.prefill_lora), with the
largest gradient difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch

from preft_rl import PreftConfig, get_preft_model
from preft_rl.plan import PRESETS
from preft_rl.trainers.grpo_core import selective_log_softmax

SHAPES = {
    "8b": {**PRESETS["llama-3-8b"], "rope_theta": 500000.0, "max_position_embeddings": 8192},  # Llama-3-8B
    # SmolLM2-135M (the offline default model); random weights take the same memory as the real ones
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}


def build_base(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"tie_word_embeddings": False, **SHAPES[shape]})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def packed_batch(vocab: int, groups: int, generations: int, prompt_len: int, completion_len: int, device):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (groups, prompt_len), generator=g).repeat_interleave(generations, 0)
    completions = torch.randint(3, vocab, (groups * generations, completion_len), generator=g)
    ids = torch.cat([prompts, completions], 1)
    am = torch.ones_like(ids)
    lengths = torch.randint(completion_len // 2, completion_len + 1, (ids.shape[0],), generator=g)
    for row, length in enumerate(lengths.tolist()):  # completions end at different lengths: right padding
        am[row, prompt_len + length :] = 0
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, :prompt_len] = True
    return ids.to(device), am.to(device), pm.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def timed(fn, device: torch.device, repeats: int) -> dict:
    rss_before = _rss_gib() if device.type == "cpu" and os.path.exists("/proc/self/statm") else None
    fn()  # warm-up (kernel compiles, allocator)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {"seconds": statistics.median(times), "all_seconds": times, "peak_gib": peak}
    if rss_before is not None:  # CPU: the process's peak RSS above its RSS before this variant (one variant per process)
        import resource

        result["rss_before_gib"] = rss_before
        result["peak_rss_above_before_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss_before
    return result


def loss_step(model, batch, prompt_len: int, share: bool, grad: bool) -> None:
    ids, am, pm = batch
    first = prompt_len - 1
    with nullcontext() if grad else torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=ids.shape[1] - first,
                       share_prompts=share).logits
        logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1 :])
        mask = am[:, first + 1 :].float()
        loss = -(logps * mask).sum() / mask.sum()
    if grad:
        loss.backward()
        for param in model.parameters():
            param.grad = None


def train_variants(args, device: torch.device, dtype: torch.dtype) -> dict:
    start = time.perf_counter()
    base = build_base(args.shape, device, dtype)
    sync(device)
    results = {"build_seconds": time.perf_counter() - start,
               "base_params": sum(p.numel() for p in base.parameters()),
               "weights_gib": sum(p.numel() * p.element_size() for p in base.parameters()) / 2**30}
    batch = packed_batch(base.config.vocab_size, args.groups, args.generations, args.prompt_len, args.completion_len, device)
    results["tokens"] = int(batch[1].sum())
    results["prompt_tokens"] = int(batch[2].sum())
    lora = dict(method="lora", r=args.rank, seed=0)
    variants = [
        ("reference pass", lora, dict(share=False, grad=False, gc=True, adapter=False)),
        ("preft-lora", lora, dict(share=False, grad=True, gc=True)),
        # the adapter arithmetic in plain torch instead of the Triton prefill kernels (the trainer before 2026-11-28)
        ("preft-lora-torch-path", lora, dict(share=False, grad=True, gc=True, backend="torch")),
        ("preft-lora-shared", lora, dict(share=True, grad=True, gc=True)),
        ("all-token-lora", {**lora, "adapter_scope": "all"}, dict(share=False, grad=True, gc=True)),
        ("preft-loreft", dict(method="loreft", r=args.rank, positions="f7+l7", seed=0), dict(share=False, grad=True, gc=True)),
        ("preft-loreft-torch-path", dict(method="loreft", r=args.rank, positions="f7+l7", seed=0),
         dict(share=False, grad=True, gc=True, backend="torch")),
        # half the batch (one group): the full batch without checkpointing does not fit 141 GB at the 8B shape
        ("preft-lora-1group", lora, dict(share=False, grad=True, gc=True, groups=1)),
        ("preft-lora-1group-no-gc", lora, dict(share=False, grad=True, gc=False, groups=1)),
    ]
    for name, config, how in variants:
        if args.only and name not in args.only:
            continue
        if how["gc"]:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        base.train(how["grad"])
        model = get_preft_model(base, PreftConfig(**config))
        context = model.disable_adapter if not how.get("adapter", True) else nullcontext
        rows = slice(0, how.get("groups", args.groups) * args.generations)
        part = tuple(t[rows] for t in batch)
        previous_backend = os.environ.get("PREFT_KERNEL_BACKEND")
        os.environ["PREFT_KERNEL_BACKEND"] = how.get("backend", previous_backend or "auto")
        try:
            with context():
                row = timed(lambda: loss_step(model, part, args.prompt_len, how["share"], how["grad"]), device, args.repeats)
        except torch.OutOfMemoryError as err:
            row = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        finally:
            if previous_backend is None:
                del os.environ["PREFT_KERNEL_BACKEND"]
            else:
                os.environ["PREFT_KERNEL_BACKEND"] = previous_backend
        row["tokens"] = int(part[1].sum())
        row["adapter_params"] = sum(p.numel() for _, p in model.adapter_named_parameters())
        results[name] = row
        model.unload()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name:<20} " + (f"{row['seconds']:.3f} s/step" if "seconds" in row else row["error"])
              + (f", peak {row['peak_gib']:.1f} GiB" if row.get("peak_gib") else ""), flush=True)
    del base
    return results


def lora_layer(args, device: torch.device, dtype: torch.dtype) -> dict:
    """One LoRA'd gate/up projection fwd+bwd at the batch's prompt rows: torch path vs the Triton prefill kernels."""
    from preft_rl.kernels import prefill_lora

    shape = SHAPES[args.shape]
    d_in, d_out = shape["hidden_size"], shape["intermediate_size"]
    rows = args.groups * args.generations * (args.prompt_len + args.completion_len)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, d_in, device=device, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.randn(d_out, d_in, device=device, dtype=dtype, generator=g) / d_in**0.5
    a = (torch.randn(args.rank, d_in, device=device, generator=g) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, args.rank, device=device, generator=g) / args.rank**0.5).requires_grad_()
    prompt = torch.zeros(rows, dtype=torch.bool, device=device)
    prompt.view(-1, args.prompt_len + args.completion_len)[:, : args.prompt_len] = True
    upstream = torch.randn(rows, d_out, device=device, dtype=dtype, generator=g)

    def step(backend: str):
        out = prefill_lora(x @ weight.T, x, a, b, 2.0, prompt, backend=backend)
        out.backward(upstream)
        grads = [t.grad.float().clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return grads

    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    result = {"rows": rows, "prompt_rows": int(prompt.sum()), "d_in": d_in, "d_out": d_out, "rank": args.rank}
    grads = {}
    for backend in backends:
        grads[backend] = step(backend)
        result[backend] = timed(lambda: step(backend), device, args.repeats)
    if len(grads) == 2:
        result["max_grad_diff"] = {name: float((t - r).abs().max() / r.abs().max().clamp_min(1e-30))
                                   for name, t, r in zip(("x", "A", "B"), grads["triton"], grads["torch"])}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).removeprefix("torch."), "config": {k: v for k, v in vars(args).items() if k != "json"}}
    results["layer"] = lora_layer(args, device, dtype)
    print("LoRA layer fwd+bwd: " + ", ".join(f"{k} {results['layer'][k]['seconds'] * 1e3:.2f} ms" for k in ("torch", "triton") if k in results["layer"]), flush=True)
    results["train"] = train_variants(args, device, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
