"""Run by tests/test_zero3_adapters.py in its own process (DeepSpeed needs a process group): one forward and backward
of a PreFT adapter under DeepSpeed ZeRO-3, called directly rather than through DeepSpeed's engine (whose forward
would discover parameters read outside their module's forward by itself) with every parameter partitioned (persistence threshold 0, so even the
smallest adapter tensor is a shard outside its module's forward), against the same step without DeepSpeed.

argv: MODEL_DIR METHOD. Prints `REGISTERED n` (adapter parameters registered with their modules), then
`MAX_LOSS_DIFF x` and `MAX_GRAD_DIFF x`, or `ERROR` with the error's type and text.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AutoModelForCausalLM

from preft_rl.adapters import PreftConfig, get_preft_model
from preft_rl.trainers.runtime import register_zero3_adapter_parameters

CONFIGS = {"lora": dict(r=4, alpha=8), "loreft": dict(r=4, layers=[0, 1]), "direft": dict(r=4, layers=[0, 1])}


def adapted_model(model_dir: str, method: str):
    model = get_preft_model(AutoModelForCausalLM.from_pretrained(model_dir), PreftConfig(method=method, seed=0, **CONFIGS[method]))
    with torch.no_grad():  # away from the no-op start, so every adapter tensor gets a gradient
        generator = torch.Generator().manual_seed(1)
        for _, param in model.adapter_named_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def loss_of(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 100, (2, 12), generator=generator)
    prompt_mask = torch.zeros(2, 12, dtype=torch.bool)
    prompt_mask[:, :7] = True
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), prompt_mask=prompt_mask).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def main() -> None:
    model_dir, method = sys.argv[1], sys.argv[2]
    plain = adapted_model(model_dir, method)
    plain_loss = loss_of(plain)
    plain_loss.backward()
    expected = {name: param.grad.clone() for name, param in plain.adapter_named_parameters()}

    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    model = adapted_model(model_dir, method)
    print("REGISTERED", register_zero3_adapter_parameters(model), flush=True)
    params = [param for _, param in model.adapter_named_parameters()]
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.0), config=config)
    try:  # called directly, not through engine.forward (as PPO calls its policy inside the wrapped actor-critic)
        for _ in range(2):  # the second step runs on DeepSpeed's recorded trace of the first
            with deepspeed.zero.GatheredParameters(params):  # as the trainer's engine sync reads the adapter
                pass
            loss = loss_of(model)
            engine.backward(loss)
            engine.step()
    except RuntimeError as err:
        print(f"ERROR {type(err).__name__}: {err}", flush=True)
        return
    from deepspeed.utils import safe_get_full_grad

    grad_diff = max((safe_get_full_grad(param) - expected[name]).abs().max().item() for name, param in model.adapter_named_parameters())
    print(f"MAX_LOSS_DIFF {abs(loss.item() - plain_loss.item()):.3e}", flush=True)
    print(f"MAX_GRAD_DIFF {grad_diff:.3e}", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:  # tear gloo and DeepSpeed's shm communicator down before the interpreter does: one CI run in many aborted
        # at exit ("terminate called without an active exception", rc -6) after printing correct numbers
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
