"""Memory plan for colocated PreFT RL: what each GPU holds while the engine rolls out and while the trainer trains.

    preft-rl plan --model llama-3-70b --gpus 8 --gpu-memory 80 --zero 3 --tp 4 --adapters 512 \
                  --prompt-len 512 --completion-len 1024 --batch 8

Each process holds the trainer (the HF model, DeepSpeed ZeRO shards, the adapter and its optimizer) and a colocated
vLLM engine (a tensor-parallel shard of the same base weights, the adapter slots, the KV cache). The two phases:

    rollout   trainer state that stays between steps + the engine at `gpu_memory_utilization` of the GPU
    training  trainer state + gradients + activations + logits + ZeRO-3's gathered layers, with the engine asleep
              (vLLM sleep mode level 1 on CUDA: weights to host memory, KV cache freed); `--no-sleep` keeps it

Every number is a formula of the model's config; the activation cost per token and layer is calibrated on a measured
run: Llama-3-8B shape, bf16, PreFT LoRA r=16, SDPA, on an H200 (docs/benchmarks/kernels-gpu.md: 53.5 GiB peak
without checkpointing for 8 rows of 768 positions) and checked against the other measured runs in tests/test_plan.py.
Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from preft_rl.adapters.methods import get_method

GiB = 2**30

# Activations saved for backward per token in one Llama decoder layer, in elements of the model dtype, counted from
# HF's code: RMSNorm keeps its fp32 input (2 elements' worth each, x2 norms) and output, q/k/v before and after RoPE,
# SDPA's output, and the MLP's gate, up, act(gate) and act(gate)*up. Times a factor fitted on the measured 8B run
# (SDPA's log-sum-exp, the adapter's saved inputs): 197 KiB per token (padded positions) per layer measured, against
# 190 KiB counted.
_ACTIVATION_CALIBRATION = 1.04

PRESETS = {  # the config.json fields the plan reads, for models a user may not have on disk
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                   heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))

    @classmethod
    def resolve(cls, model: str) -> ModelShape:
        """A preset name, a config.json, a model folder, or anything preft_rl.models.resolve_model finds offline."""
        if model.lower() in PRESETS:
            return cls.from_config(PRESETS[model.lower()])
        path = model
        if not os.path.exists(path):
            from preft_rl.models import resolve_model

            path = resolve_model(model)
        if not os.path.exists(path):  # a hub id: its config.json from the local cache, never the network
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            path = cached if isinstance(cached, str) else path
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no model config for {model!r}: give a preset ({', '.join(PRESETS)}), a config.json or a "
                             "model folder (hub ids are read from the local Hugging Face cache only)")
        with open(path) as f:
            config = json.load(f)
        return cls.from_config(config.get("text_config", config))

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.intermediate
        return h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden

    def linear_io(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every linear layer in one decoder layer, as PreFT LoRA 'all-linear' targets them."""
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def activation_elems_per_token_layer(self, dtype_bytes: int = 2) -> float:
        h, kv, i = self.hidden, self.kv_size, self.intermediate
        norm_in = 4 / dtype_bytes * h  # RMSNorm keeps its input upcast to fp32
        attention = norm_in + h + (self.q_size + 2 * kv) + (self.q_size + kv) + h  # norm in + out, qkv, RoPE'd q/k, SDPA out
        mlp = norm_in + h + 4 * i  # norm in + out, gate, up, act(gate), act(gate) * up
        return (attention + mlp) * _ACTIVATION_CALIBRATION


def adapter_params(shape: ModelShape, method: str, rank: int) -> int:
    """Trainable parameters of one PreFT adapter (LoRA on every linear layer; ReFT at every layer, one intervention)."""
    return get_method(method).plan_adapter_params(shape, rank)


def engine_adapter_slot_elems(shape: ModelShape, method: str, rank: int, tp: int) -> float:
    """Elements one adapter slot takes in the engine's stacked tensors on one rank (the method's own count: LoRA
    sharded like vLLM's multi-LoRA, ReFT replicated)."""
    return get_method(method).plan_slot_elems(shape, rank, tp)


@dataclass
class PlanInputs:
    gpus: int = 8
    gpu_memory_gib: float = 80.0
    zero: int = 3
    tp: int = 1  # engine tensor parallel size
    adapters: int = 1  # adapter slots the engine holds (at least one per tenant)
    tenants: int = 1  # adapters trained in one run (PreftGRPOTrainer(tenants=...)); each process holds all of them
    tenants_per_step: int | None = None  # tenants trained per step (None: all); each brings `batch` rows per micro-batch
    tenants_per_forward: int | None = None  # tenants' rows in one training forward/backward (None: the step's tenants)
    tenant_offload: str | None = None  # where tenants not in the step wait: None (on the GPU), "cpu" (host memory), "disk"
    method: str = "lora"
    rank: int = 16
    prompt_len: int = 512
    completion_len: int = 1024
    batch: int = 8  # rows per micro-batch per GPU (per_device_train_batch_size)
    generations: int = 8  # completions per prompt (shared prompt forward computes each prompt once)
    share_prompts: bool = True
    gradient_checkpointing: bool = True
    dtype_bytes: int = 2
    sleep: bool = True  # vLLM sleep mode level 1 while training (CUDA)
    gpu_memory_utilization: float | None = None  # the engine's share; None = as much as the trainer leaves
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    overhead_gib: float = 2.0  # CUDA context, NCCL buffers, allocator slack per process

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "adapters", "tenants", "rank", "prompt_len", "completion_len", "batch", "generations",
                     "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tenants_per_step is not None and not 1 <= self.tenants_per_step <= self.tenants:
            raise ValueError(f"--tenants-per-step must be in [1, --tenants={self.tenants}], got {self.tenants_per_step}")
        if self.tenants_per_forward is not None and self.tenants_per_forward < 1:
            raise ValueError(f"--tenants-per-forward must be >= 1, got {self.tenants_per_forward}")
        if self.tenant_offload not in (None, "cpu", "disk"):
            raise ValueError(f"--tenant-offload must be cpu or disk, got {self.tenant_offload!r}")
        if self.tenant_offload is not None and self.zero != 0:
            raise ValueError(f"--tenant-offload runs under DDP (--zero 0), not ZeRO-{self.zero}: DeepSpeed's optimizer holds "
                             "every tenant's state")
        self.adapters = max(self.adapters, self.resident_tenants)  # the engine serves every tenant in the model
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.gpus % self.tp:
            raise ValueError(f"--tp {self.tp} must divide --gpus {self.gpus}: TP groups are consecutive ranks")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1), got {self.gpu_memory_utilization}")

    @property
    def step_tenants(self) -> int:
        """Tenants trained in one step (each with its own `batch` rows in every micro-batch)."""
        return self.tenants if self.tenants_per_step is None else self.tenants_per_step

    @property
    def resident_tenants(self) -> int:
        """Tenants whose adapter, gradient and Adam state are on the GPU: every tenant, or with offload the step's."""
        return self.step_tenants if self.tenant_offload else self.tenants

    @property
    def forward_tenants(self) -> int:
        """Tenants whose rows one training forward holds (its activations): tenants_per_forward, at most the step's."""
        return min(self.step_tenants, self.tenants_per_forward or self.step_tenants)


@dataclass
class Plan:
    inputs: PlanInputs
    shape: ModelShape
    rollout: dict[str, float] = field(default_factory=dict)  # item -> bytes per GPU
    training: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # item -> bytes of host memory or disk per process
    kv_budget_bytes: float = 0.0
    kv_bytes_per_sequence: float = 0.0
    max_sequences: int = 0
    max_batch: int = 0
    gpu_memory_utilization: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def _tokens(inputs: PlanInputs, rows: int) -> int:
    """Token positions one micro-batch of `rows` runs through the decoder (padded rows; a shared prompt once per group)."""
    if inputs.share_prompts:
        groups = math.ceil(rows / inputs.generations)
        return groups * inputs.prompt_len + rows * (inputs.completion_len + 1)
    return rows * (inputs.prompt_len + inputs.completion_len)


def training_activations(shape: ModelShape, inputs: PlanInputs, rows: int) -> dict[str, float]:
    e = inputs.dtype_bytes
    tokens = _tokens(inputs, rows)
    per_layer = tokens * shape.activation_elems_per_token_layer(e) * e
    if inputs.gradient_checkpointing:
        items = {"activations: layer-input checkpoints": tokens * shape.layers * shape.hidden * e,
                 "activations: one layer recomputed": per_layer}
    else:
        items = {"activations: every layer": per_layer * shape.layers}
    kept = rows * (inputs.completion_len + 1)  # logits_to_keep: the completion's positions
    items["logits and their gradient"] = 2 * kept * shape.vocab * e + 2 * (inputs.completion_len + 1) * shape.vocab * 4
    return items


def tenant_bytes(shape: ModelShape, inputs: PlanInputs) -> float:
    """Memory per GPU one more tenant adds: its fp32 adapter, gradient and Adam moments (sharded as ZeRO shards them)
    and its engine slot. With tenant_offload: none (it waits in host memory or on disk: `offloaded_tenant_bytes`)."""
    n, adapter = inputs.gpus, adapter_params(shape, inputs.method, inputs.rank)
    if inputs.tenant_offload:
        return 0.0
    return (adapter * 4 / (n if inputs.zero == 3 else 1) + 8 * adapter / (n if inputs.zero >= 1 else 1)
            + 4 * adapter / (n if inputs.zero >= 2 else 1)
            + engine_adapter_slot_elems(shape, inputs.method, inputs.rank, inputs.tp) * inputs.dtype_bytes)


def offloaded_tenant_bytes(shape: ModelShape, inputs: PlanInputs) -> float:
    """Host memory or disk per process one more waiting tenant takes (once it has trained): fp32 adapter + Adam moments."""
    return 12.0 * adapter_params(shape, inputs.method, inputs.rank)


def make_plan(shape: ModelShape, inputs: PlanInputs) -> Plan:
    plan = Plan(inputs, shape)
    e, n, g = inputs.dtype_bytes, inputs.gpus, inputs.gpu_memory_gib * GiB
    one = adapter_params(shape, inputs.method, inputs.rank)
    resident = inputs.resident_tenants
    params, adapter = shape.params(), one * resident
    base = params * e / (n if inputs.zero == 3 else 1)
    persistent = {
        f"trainer base weights (ZeRO-{inputs.zero}{', sharded' if inputs.zero == 3 else ''})": base,
        f"adapter{'s' if resident > 1 else ''} (fp32{f', {resident} tenants' if resident > 1 else ''})":
            adapter * 4 / (n if inputs.zero == 3 else 1),
        "Adam moments (fp32)": 8 * adapter / (n if inputs.zero >= 1 else 1),
        "CUDA context, NCCL, allocator slack": inputs.overhead_gib * GiB,
    }
    # engine: weights by TP, adapter slots, activation workspace of one scheduler step, then the KV cache
    engine = {
        f"engine base weights (TP={inputs.tp})": params * e / inputs.tp,
        f"engine adapter slots ({inputs.adapters} x {inputs.method} r={inputs.rank})":
            inputs.adapters * engine_adapter_slot_elems(shape, inputs.method, inputs.rank, inputs.tp) * e,
        "engine step workspace (estimate)": inputs.max_num_batched_tokens * (4 * shape.hidden + (shape.q_size + 2 * shape.kv_size
                                             + 4 * shape.intermediate) / inputs.tp) * e + inputs.max_num_seqs * shape.vocab * 4,
    }
    # host memory and disk, per process: the copy of the adapters that last served (what a bad update is rolled back to),
    # and with tenant_offload the waiting tenants' adapter and Adam moments (fp32; a tenant that never trained has none)
    plan.host["last served adapters (host memory, rollback copy)"] = adapter * 4 / (n if inputs.zero == 3 else 1)
    if inputs.tenant_offload:
        where = "host memory" if inputs.tenant_offload == "cpu" else "disk"
        plan.host[f"{inputs.tenants - resident} waiting tenants: adapter + Adam moments ({where})"] = (inputs.tenants - resident) * one * 12
    trainer_fixed = sum(persistent.values())
    util = inputs.gpu_memory_utilization
    if util is None:  # what the trainer leaves, floored to 0.01 as a user would set it
        util = max(0.0, math.floor((g - trainer_fixed) / g * 100) / 100)
    plan.gpu_memory_utilization = util
    kv_heads_per_rank = max(1, shape.kv_heads // inputs.tp)
    plan.kv_bytes_per_sequence = 2 * shape.layers * kv_heads_per_rank * shape.head_dim * e * (inputs.prompt_len + inputs.completion_len)
    plan.kv_budget_bytes = util * g - sum(engine.values())
    plan.max_sequences = max(0, int(plan.kv_budget_bytes // plan.kv_bytes_per_sequence))
    plan.rollout = {**persistent, **engine, "engine KV cache": max(0.0, plan.kv_budget_bytes)}

    training_fixed = dict(persistent)
    training_fixed["adapter gradients (fp32)"] = 4 * adapter / (n if inputs.zero >= 2 else 1)
    if inputs.zero == 3:  # the layer being computed and the one prefetched, gathered whole
        training_fixed["ZeRO-3 gathered layers"] = 2 * shape.layer_params() * e
    if not inputs.sleep:
        training_fixed["engine, awake (no sleep mode)"] = util * g
    free = g - sum(training_fixed.values())
    plan.max_batch = 0
    per_row = inputs.forward_tenants  # a training forward holds `batch` rows of each of its tenants
    for rows in range(1, 4097):
        if sum(training_activations(shape, inputs, rows * per_row).values()) > free:
            break
        plan.max_batch = rows
    plan.training = {**training_fixed, **training_activations(shape, inputs, inputs.batch * per_row)}

    # what does not fit, and what to change
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    if engine[f"engine base weights (TP={inputs.tp})"] + trainer_fixed > g:
        need_tp = next((k for k in (2, 4, 8, 16) if k <= n and n % k == 0 and params * e / k + trainer_fixed < g), None)
        plan.problems.append(f"the engine's weights ({gib(params * e / inputs.tp)} per GPU at TP={inputs.tp}) and the trainer's "
                             f"state ({gib(trainer_fixed)}) exceed {gib(g)}: "
                             + (f"use --tp {need_tp}" if need_tp else "more GPUs or ZeRO-3 are needed"))
    if inputs.zero < 3 and base > 0.5 * g:
        plan.problems.append(f"ZeRO-{inputs.zero} keeps all {gib(base)} of base weights on every GPU: use --zero 3 "
                             f"({gib(params * e / n)} per GPU on {n} GPUs)")
    needed = inputs.tp * inputs.batch * inputs.step_tenants  # a TP group generates for the rows of all its ranks at once
    slots = engine[f"engine adapter slots ({inputs.adapters} x {inputs.method} r={inputs.rank})"]
    if plan.max_sequences < needed:
        largest = max(("the adapter slots", slots), ("the engine's base weights", params * e / inputs.tp),
                      ("the trainer's state", trainer_fixed), key=lambda item: item[1])
        fixes = {"the adapter slots": "fewer --adapters or a lower --rank",
                 "the engine's base weights": "a larger --tp",
                 "the trainer's state": "--zero 3 or more --gpus"}
        plan.problems.append(
            f"the KV cache ({gib(max(0.0, plan.kv_budget_bytes))}) holds {plan.max_sequences} sequences of "
            f"{inputs.prompt_len + inputs.completion_len} tokens, fewer than the {needed} a TP group generates at once "
            f"(--tp x --batch{' x tenants per step' if inputs.step_tenants > 1 else ''}); the largest item is {largest[0]} ({gib(largest[1])}): {fixes[largest[0]]}, or shorter sequences")
    if plan.max_batch == 0:
        plan.problems.append(f"not even one training row fits: the trainer's fixed state and the engine need "
                             f"{gib(sum(training_fixed.values()))} of {gib(g)} while training; fix the items above first")
    elif plan.max_batch < inputs.batch:
        fix = "turn on gradient checkpointing" if not inputs.gradient_checkpointing else "raise --gpus (ZeRO-3 shards more)"
        plan.problems.append(f"a training micro-batch of {inputs.batch} rows{' per tenant' if per_row > 1 else ''} needs {gib(sum(plan.training.values()))}; at most "
                             f"{plan.max_batch} rows fit: use --batch {plan.max_batch} with gradient accumulation, or {fix}")
    return plan


def format_plan(plan: Plan) -> str:
    i, s = plan.inputs, plan.shape
    lines = [
        f"model: {s.params() / 1e9:.2f} B parameters ({s.layers} layers, hidden {s.hidden}, {s.kv_heads} KV heads); "
        f"adapter: {i.method} r={i.rank}, {adapter_params(s, i.method, i.rank) / 1e6:.1f} M trainable parameters",
        f"{i.gpus} GPUs x {i.gpu_memory_gib:g} GiB, ZeRO-{i.zero}, engine TP={i.tp}, {i.adapters} adapter slots; micro-batch "
        f"{i.batch} rows of {i.prompt_len} + {i.completion_len} tokens ({'shared prompts' if i.share_prompts else 'prompts per row'}, "
        f"gradient checkpointing {'on' if i.gradient_checkpointing else 'off'}, engine {'asleep' if i.sleep else 'awake'} while training)",
        "",
    ]
    for title, items in (("rollout phase, per GPU", plan.rollout), ("training phase, per GPU", plan.training)):
        lines.append(f"{title}:")
        lines += [f"  {name:<58}{value / GiB:>9.2f} GiB" for name, value in items.items()]
        lines.append(f"  {'total':<58}{sum(items.values()) / GiB:>9.2f} GiB of {i.gpu_memory_gib:g}")
        lines.append("")
    lines.append("host memory and disk, per process:")
    lines += [f"  {name:<58}{value / GiB:>9.2f} GiB" for name, value in plan.host.items()]
    lines.append("")
    lines.append(f"engine gpu_memory_utilization: {plan.gpu_memory_utilization:.2f}; KV cache {max(0.0, plan.kv_budget_bytes) / GiB:.1f} GiB = "
                 f"{plan.max_sequences} sequences of {i.prompt_len + i.completion_len} tokens "
                 f"({plan.kv_bytes_per_sequence / 2**20:.0f} MiB each) per TP group")
    lines.append(f"largest training micro-batch that fits: {plan.max_batch} rows"
                 + (f" per tenant ({i.step_tenants} tenants per step, {i.forward_tenants} per forward)" if i.step_tenants > 1 else ""))
    if i.tenants > 1 and i.tenant_offload:
        lines.append(f"each further tenant adds nothing on the GPU and {offloaded_tenant_bytes(s, i) / 2**20:.1f} MiB of "
                     f"{'host memory' if i.tenant_offload == 'cpu' else 'disk'} per process once it has trained (adapter, Adam moments)")
    elif i.tenants > 1:
        lines.append(f"each further tenant adds {tenant_bytes(s, i) / 2**20:.1f} MiB per GPU (adapter, gradient, Adam moments, "
                     "engine slot)")
    lines.append("fits." if plan.fits else "does NOT fit:\n" + "\n".join(f"  - {p}" for p in plan.problems))
    return "\n".join(lines)
