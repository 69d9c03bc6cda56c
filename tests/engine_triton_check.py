"""Run by test_engine.py in a child process with TRITON_INTERPRET=1 and PREFT_KERNEL_BACKEND=triton:
the engine's adapter ops go through the Triton kernels (interpreted on CPU) and must still equal the
HF reference. Usage: python engine_triton_check.py METHOD MODEL_DIR; prints RESULT <tokens equal> LAUNCHES <n>, n the
number of Triton kernel launches the engine's adapter ops made (vLLM imports triton anyway: only launches prove it ran)."""

import os
import sys

if __name__ == "__main__":
    import torch
    from preft_rl import PreftEngine, PreftConfig, get_preft_model
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    d = sys.argv[2]
    method = sys.argv[1]
    eng = PreftEngine(d, max_adapters=4, max_rank=8, method=method, max_model_len=256, max_num_batched_tokens=64)
    refs = []
    for i in range(2):
        cfg = PreftConfig(method=method, r=4, seed=i) if method == "lora" else PreftConfig(method=method, r=4, positions="f2+l2", seed=i)
        hf = get_preft_model(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), cfg)
        with torch.no_grad():
            for n, p in hf.adapter_named_parameters(): p.add_(torch.randn_like(p) * 0.3)
        hf.base_model.generation_config.eos_token_id = None
        eng.add_adapter(f"a{i}", hf); refs.append(hf)
    prompts = [list(range(10, 90)), list(range(50, 60)), list(range(100, 120))]
    names = ["a0", None, "a1"]
    outs = eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters=names, use_tqdm=False)
    ok = True
    for p, n, o in zip(prompts, names, outs):
        ids = torch.tensor([p])
        if n is None:
            with refs[0].disable_adapter(): g = refs[0].generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        else: g = refs[int(n[1])].generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        ok &= g[0, len(p):].tolist() == list(o.outputs[0].token_ids)
    from preft_rl.kernels import triton_common

    print("RESULT", ok, "LAUNCHES", sum(triton_common.LAUNCHES.values()) if os.environ.get("TRITON_INTERPRET") == "1" else 0)
    eng.close()
