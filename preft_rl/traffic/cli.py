"""`preft-rl online`: the online loop beside a recording server (preft_rl/traffic/online.py).

    preft-rl serve smollm2-135m-instruct --tenant-keys keys.yaml --record traffic/ --enable-adapter-updates \\
        --api-key ADMIN --adapter-dir adapters/ ...
    preft-rl online --tenants tenants.yaml --record traffic/ --push-to-server http://127.0.0.1:8000 \\
        --push-api-key ADMIN --output-dir outputs/online

The tenants file is `preft-rl`'s (preft_rl/data/tenants.py) without `data` or `traffic`: each tenant's name (its adapter's served
name), its reward functions and optionally its learning rate. Each round's trained adapters are pushed into the
server under the tenants' names.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.adapters.methods import method_names
    from preft_rl.models import DEFAULT_MODEL

    parser.add_argument("--tenants", required=True, metavar="FILE", help="tenants file: name, rewards, learning_rate")
    parser.add_argument("--record", required=True, metavar="DIR", help="the folder the server records into (--record)")
    parser.add_argument("--output-dir", default="outputs/online", help="checkpoints and adapters (default: %(default)s)")
    parser.add_argument("--push-to-server", default=None, metavar="URL", help="the server to push trained adapters to")
    parser.add_argument("--push-api-key", default=None, help="its admin key (default: $PREFT_RL_PUSH_API_KEY)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model, as the server's (default: %(default)s)")
    parser.add_argument("--method", choices=method_names(), default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--min-new", type=int, default=8, help="new rows a tenant needs to be trained (default: %(default)s)")
    parser.add_argument("--rows-per-round", type=int, default=None, help="rows per tenant per round (default: --min-new)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reads when none is ready")
    parser.add_argument("--max-rounds", type=int, default=None, help="stop after N rounds (default: at SIGTERM)")
    parser.add_argument("--tenants-per-step", type=int, default=8)
    parser.add_argument("--tenant-offload", choices=["cpu", "disk"], default=None, help="keep only the tenants a round "
                        "trains in the model and optimizer, the others' adapters and AdamW state in host memory or on disk "
                        "(<output-dir>/tenant_state): for many tenants (default: every tenant in the model)")
    parser.add_argument("--tenants-per-forward", type=int, default=2, help="tenants' rows per training forward: bounds "
                        "activation memory (default: %(default)s)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4, help="prompts per tenant per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature: the one the users' requests "
                        "use, so the recorded log-probs are the trainer's kind (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight to the base model (default: %(default)s)")
    parser.add_argument("--max-staleness", type=int, default=2, help="versions a served response may be behind")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, Tenant
    from preft_rl.data import read_tenants_file
    from preft_rl.traffic import SqliteTrafficStore
    from preft_rl.traffic.online import OnlineConfig, OnlineLoop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        entries = read_tenants_file(args.tenants, require_data=False)
        if with_traffic := [e.name for e in entries if e.traffic is not None]:
            raise ValueError(f"{args.tenants}: tenant(s) {with_traffic} name a traffic folder; the loop reads every "
                             "tenant's traffic from --record, so leave the field out")
        loop_config = OnlineConfig(min_new=args.min_new, rows_per_round=args.rows_per_round, interval_s=args.interval,
                                   max_rounds=args.max_rounds, max_staleness=args.max_staleness, seed=args.seed)
        if not os.path.isdir(args.record):
            raise ValueError(f"--record {args.record}: not a folder; pass the folder `preft-rl serve --record` writes")
        config = PreftGRPOConfig(
            output_dir=args.output_dir, lr_scheduler_type="constant", learning_rate=args.learning_rate,
            num_generations=args.num_generations, per_device_train_batch_size=args.prompts_per_step * args.num_generations,
            gradient_accumulation_steps=1, max_completion_length=args.max_completion_length, seed=args.seed,
            temperature=args.temperature, beta=args.beta,
            tenants_per_step=min(args.tenants_per_step, len(entries)), save_steps=0, tenant_offload=args.tenant_offload,
            tenants_per_forward=args.tenants_per_forward, push_to_server=args.push_to_server,
            push_api_key=args.push_api_key or os.environ.get("PREFT_RL_PUSH_API_KEY"))
    except (ValueError, OSError) as exc:
        print(f"preft-rl online: {exc}", file=sys.stderr)
        return 2
    from datasets import Dataset

    waiting = Dataset.from_list([{"prompt": "(no traffic yet)"}])  # built with; only rounds of traffic train
    tenants = [Tenant(e.name, waiting, e.rewards, e.reward_weights, e.learning_rate) for e in entries]
    trainer = PreftGRPOTrainer(args.model, args=config, tenants=tenants,
                               preft_config=PreftConfig(method=args.method, r=args.rank))
    store = SqliteTrafficStore(args.record)
    loop = OnlineLoop(trainer, store, loop_config)
    try:
        loop.run()
    finally:
        trainer.close()
        store.close()
    print(f"preft-rl online: {loop.rounds} rounds, step {trainer.step}; adapters in {args.output_dir}/tenants/")
    return 0
