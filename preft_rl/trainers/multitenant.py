"""Many tenants' adapters trained in one GRPO run, each exactly as if it were trained alone.

    trainer = PreftGRPOTrainer(model, args=PreftGRPOConfig(..., tenants_per_step=8), tenants=[Tenant("alice", ds_a,
                               [fmt_hash]), Tenant("bob", ds_b, [fmt_boxed], learning_rate=5e-4), ...], preft_config=cfg)

One base model, one TenantPreftModel (each row of a forward uses its tenant's adapter through the multi-adapter ops),
one engine holding every tenant's adapter, one rollout batch with every picked tenant's requests. What a tenant sees is
what its own single-tenant run would see with the same seed and data:
  - its prompts come from its own dataset in its own seeded order, and its completions' sampling seeds derive from
    (seed, the tenant's own step, index in its own batch): the tenant's k-th trained step is its alone run's step k;
  - `per_device_train_batch_size` and `num_generations` are per tenant; micro-batch j holds each tenant's j-th
    micro-batch of its alone run, and a GRPO group never spans tenants;
  - its advantages come from its own rewards, its loss is normalised over its own tokens, its gradient is clipped by
    its own norm, and it has its own learning rate and schedule (counted in its own optimizer steps) in one AdamW
    whose parameter groups are the tenants;
  - a tenant not picked in a step is not in that step's graph: no gradient, so AdamW leaves its weights and state
    untouched (weight decay included), and its schedule does not advance.
Since tenants' adapters are disjoint parameters, the sum of the tenants' losses has, for each tenant, exactly the
gradient of that tenant's own loss. Each tenant's adapter is written to <output_dir>/tenants/<name>/ (a normal adapter
folder, loadable by PreftModel.from_pretrained and `preft-rl serve --adapters name=dir`). The same argument makes
`tenants_per_forward=K` exact: a micro-batch goes through the model in pieces of K tenants' rows, each its own forward
and backward, so activation memory is bounded by K whatever the tenant count.

With `tenant_offload='cpu' | 'disk'` (and tenants_per_step=K) the model has K rows, the optimizer K groups and the
engine K slots: before a step the picked tenants are brought into the rows, and the others' adapter and AdamW state
wait in host memory or one file each (tenant_state.py); the training is the same bit for bit.

Under DDP, a tenant not in a step (or not in the last piece of a micro-batch) gets a zero-weight term, so DDP's single
reduction per micro-batch covers every adapter; the zeros of a tenant not picked are dropped before the optimizer step.
Under DeepSpeed ZeRO-2 every tenant trains every step, in one piece, and clipping is off (DeepSpeed clips by one global
norm, counts every backward as a micro-batch, and its optimizer would step a tenant without a gradient). Not yet:
ZeRO-3, dynamic sampling, eval_dataset (held-out scores per tenant come from tenant_evaluation_scores) and PPO.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from preft_rl.adapters import TenantPreftModel
from preft_rl.adapters.serialization import KEY_PREFIX, WEIGHTS_NAME
from preft_rl.adapters.tenants import check_tenant_names
from preft_rl.traffic.data import SERVED_COLUMNS, served_member

from .advantages import get_advantage_estimator
from .core import MiniBatch, resolve_task
from .grpo_core import nanstd
from .grpo_trainer import PreftGRPOTrainer
from .rollout import RolloutBatch, Samples, reward_error_count, score
from .runtime import PhaseRecorder, deepspeed_zero_stage, gathered
from .tenant_state import STATE_SEPARATOR, StoredAdapter, TenantRows, TenantStateStore, read_checkpoint_entries

logger = logging.getLogger(__name__)
TENANTS_DIR = "tenants"
TENANT_STATE_DIR = "tenant_state"  # with tenant_offload: a checkpoint's folder of every trained tenant's state


@dataclass
class Tenant:
    """One user's training task: a name (its adapter folder and its served adapter name: letters, digits, '_', '-'),
    its own prompts and reward functions (with weights), optionally its own peak learning rate, and its own tools or
    environment (as PreftGRPOTrainer takes them: its rollouts are multi-turn, the other tenants' are not changed).
    Instead of a dataset, `traffic=DIR` trains on what `preft-rl serve --record DIR` recorded of this tenant: its
    prompts, and its served responses with feedback as off-policy group members (preft_rl.traffic.data)."""

    name: str
    train_dataset: Any = None
    reward_funcs: Callable | str | Sequence[Callable | str] = ()
    reward_weights: Sequence[float] | None = None
    learning_rate: float | None = None
    tools: Sequence[Callable] | None = None
    environment_factory: Callable[[], Any] | None = None
    traffic: Any = None  # a `preft-rl serve --record` folder: train on this tenant's recorded traffic (read_traffic)

    def __post_init__(self) -> None:
        if (self.train_dataset is None) == (self.traffic is None):
            raise ValueError(f"tenant {self.name!r}: give train_dataset or traffic (a --record folder), one of them")


def _round_at(rounds: Sequence[tuple[int, int, list[int], dict[int, int]]], step: int) -> Any:
    """The train_round round that run step `step` belongs to, or None."""
    return next((found for found in rounds if found[0] <= step < found[1]), None)


@dataclass
class _Task:
    """A tenant, checked: its dataset, resolved reward functions, their names and weights, and its learning rate."""

    name: str
    dataset: Any
    reward_funcs: list[Callable]
    reward_names: list[str]
    reward_weights: torch.Tensor
    learning_rate: float


class TenantSchedules:
    """Each tenant's learning-rate schedule, counted in that tenant's own optimizer steps: the optimizer's parameter
    group holding tenant t gets lr_t * schedules[t](steps_t). `groups[g]` is the tenant group g holds (every tenant its
    own group by default; with tenant_offload, the tenant in row g, None for an empty row). The state (each tenant's
    step count) is saved with checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedules: list[Callable[[int], float]], base_lrs: list[float],
                 groups: list[int | None] | None = None) -> None:
        self.optimizer, self.schedules, self.base_lrs = optimizer, schedules, base_lrs
        self.groups = list(range(len(base_lrs))) if groups is None else list(groups)
        self.steps = [0] * len(base_lrs)
        self._apply()

    def lr_of(self, tenant: int) -> float:
        return self.base_lrs[tenant] * self.schedules[tenant](self.steps[tenant])

    def _apply(self) -> None:
        for group, tenant in zip(self.optimizer.param_groups, self.groups):
            if tenant is not None:
                group["lr"] = self.lr_of(tenant)

    def assign(self, groups: list[int | None]) -> None:
        """The tenants the groups hold now (tenant_offload moved tenants between rows)."""
        self.groups = list(groups)
        self._apply()

    def step(self, tenants: Sequence[int] = ()) -> None:
        """Advance the schedules of these tenants (indices) by one optimizer step."""
        for t in tenants:
            self.steps[t] += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = state.get("steps")
        if not isinstance(steps, list) or len(steps) != len(self.steps) or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ValueError(f"expected the step counts of {len(self.steps)} tenants, got {steps!r:.80}")
        self.steps = list(steps)
        self._apply()


class MultiTenantGRPOTrainer(PreftGRPOTrainer):
    """PreftGRPOTrainer with tenants= (PreftGRPOTrainer(..., tenants=[...]) builds one): see the module docstring."""

    display_name = "PreFT GRPO (tenants)"

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, preft_config: Any = None, tenants: Sequence[Tenant] | None = None,
                 tools: Any = None, environment_factory: Any = None) -> None:
        if tools is not None or environment_factory is not None:
            raise ValueError("with tenants=, give each tenant its own tools: Tenant(name, dataset, rewards, tools=[...]) or "
                             "Tenant(..., environment_factory=...), not tools= / environment_factory= on the trainer")
        given = [name for name, value in (("reward_funcs", reward_funcs), ("train_dataset", train_dataset),
                                          ("eval_dataset", eval_dataset)) if value is not None]
        if given:
            raise ValueError(f"with tenants=, pass no {', '.join(given)}: each Tenant carries its own train_dataset and "
                             "reward_funcs (eval_dataset is not supported with tenants yet)")
        if not isinstance(tenants, (list, tuple)) or not all(isinstance(t, Tenant) for t in tenants):
            raise TypeError(f"tenants must be a list of preft_rl.Tenant, got {tenants!r:.120}")
        self._tenant_specs = list(tenants)
        # train_round: (first step, end step, tenant indices, {tenant: its own step at the first step}) per round
        self._rounds: list[tuple[int, int, list[int], dict[int, int]]] = []
        super().__init__(model, args=args, preft_config=preft_config)
        self._pick_counts = [[0] * len(self.tasks)]

    # ------------------------------------------------------------------------------ set-up hooks
    def _setup_tasks(self, reward_funcs: Any, train_dataset: Any, eval_dataset: Any) -> None:
        names = check_tenant_names([t.name for t in self._tenant_specs])
        self.tasks = []
        for spec in self._tenant_specs:
            if spec.learning_rate is not None and not (math.isfinite(spec.learning_rate) and spec.learning_rate > 0):
                raise ValueError(f"tenant {spec.name!r}: learning_rate={spec.learning_rate} must be a finite number > 0")
            train = spec.train_dataset
            if spec.traffic is not None:
                from preft_rl.traffic.data import read_traffic

                train = read_traffic(spec.traffic, spec.name, seed=self.args.seed)
            dataset, funcs, reward_names, weights = resolve_task(train, spec.reward_funcs, spec.reward_weights,
                                                                  f"tenant {spec.name!r} train_dataset", type(self).__name__)
            self._check_traffic_rows(spec, dataset)
            self.tasks.append(_Task(spec.name, dataset, funcs, reward_names, weights, spec.learning_rate or self.args.learning_rate))
        self.tenant_names = tuple(names)
        self._tenant_index = {name: t for t, name in enumerate(names)}
        self._rows: TenantRows | None = None  # with tenant_offload: which tenant each row of the model holds
        self._unserved: set[str] = set()  # with tenant_offload: tenants trained since the engine last served them
        self._changed: set[str] = set()  # tenants in the model whose adapter the engine does not have in this version
        self._tenant_toolsets: list[Any] = []  # each tenant's tools.Toolset or None, built with the tokenizer (_setup_tools)
        self._unpushed: set[str] = set(names)  # adapters push_to_server has not got in their current version
        self.served_versions: dict[str, int] = {}  # the version the server reported for each pushed adapter
        self.train_dataset, self.eval_dataset = None, None
        self.reward_funcs, self.reward_names, self.reward_weights = [], [], torch.zeros(0)

    def _check_traffic_rows(self, spec: Tenant, dataset: Any) -> None:
        """Rows from traffic_dataset (served responses) need the importance weights, and no tools."""
        if not set(SERVED_COLUMNS) <= set(getattr(dataset, "column_names", None) or ()):
            return
        if spec.tools is not None or spec.environment_factory is not None:
            raise ValueError(f"tenant {spec.name!r}: training on traffic with tools is not supported yet (a served "
                             "multi-turn response cannot join a group); give the tenant no tools")
        if not self.args.vllm_importance_sampling_correction:
            raise ValueError(f"tenant {spec.name!r} trains on served responses, which an earlier adapter sampled: "
                             "set vllm_importance_sampling_correction=True (their importance weights)")

    def _setup_tools(self, tools: Any, environment_factory: Any) -> None:
        """Each tenant's own toolset (checked as a single-tenant run checks its tools); the run has none of its own."""
        from .tools import Toolset

        self._toolset = None
        self._tenant_toolsets = [Toolset.build(self.tokenizer, spec.tools, spec.environment_factory, task.dataset,
                                               f"tenant {task.name!r}: ") for spec, task in zip(self._tenant_specs, self.tasks)]

    def _check_runtime(self) -> None:
        args, acc = self.args, self.accelerator
        every_step = len(self._tenants_for_step(0)) == len(self.tasks)
        stage = deepspeed_zero_stage(acc)
        if stage is not None:
            if stage != 2:
                raise ValueError(f"tenants= runs under DeepSpeed ZeRO-2 only, not ZeRO-{stage} yet; use ZeRO-2 or DDP")
            clipping = acc.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping", 0.0)
            if clipping and clipping > 0:
                raise ValueError(f"tenants= under DeepSpeed needs gradient clipping off (gradient_clipping={clipping}): "
                                 "DeepSpeed clips by one norm over every tenant, which would couple them; set "
                                 "max_grad_norm=0 (and gradient_clipping to 0 or 'auto' in the DeepSpeed config), or use DDP, "
                                 "which clips each tenant by its own norm")
            if not every_step:
                raise ValueError(f"tenants= under DeepSpeed needs every tenant in every step (tenants_per_step="
                                 f"{args.tenants_per_step} < {len(self.tasks)} tenants): DeepSpeed's optimizer would step "
                                 "the others' weights with zero gradients; use tenants_per_step=None or DDP")
            if args.tenant_offload is not None:
                raise ValueError(f"tenant_offload={args.tenant_offload!r} does not work under DeepSpeed (its optimizer holds "
                                 "every tenant's state); use DDP, or tenant_offload=None")
            chunk = args.tenants_per_forward
            if chunk is not None and chunk < len(self.tasks):
                raise ValueError(f"tenants_per_forward={chunk} below the {len(self.tasks)} tenants does not work under "
                                 "DeepSpeed (it counts every backward as a micro-batch); set tenants_per_forward=None and "
                                 "bound activation memory with gradient_checkpointing=True, or use DDP")
        if args.dynamic_sampling:
            raise ValueError("dynamic_sampling is not supported with tenants= yet; set dynamic_sampling=False")
        if args.engine_tensor_parallel_size > 1:
            raise ValueError("engine_tensor_parallel_size > 1 is not supported with tenants= yet")
        if args.push_adapter_name is not None:
            raise ValueError(f"push_adapter_name={args.push_adapter_name!r} is for a single-adapter run; with tenants= each "
                             "tenant is pushed under its own name")

    def _describe_run(self) -> str:
        picked = len(self._tenants_for_step(0))
        offload = f", the others' state on {self.args.tenant_offload}" if self.args.tenant_offload else ""
        return (f"{len(self.tasks)} tenants, {picked} per step ({self.args.tenant_sampling if picked < len(self.tasks) else 'all'}"
                f"{offload}); per tenant: {super()._describe_run()}")

    def _num_train_rows(self) -> int:
        return max(len(task.dataset) for task in self.tasks)

    def _build_policy(self, base: torch.nn.Module, config: Any) -> torch.nn.Module:
        """Every tenant's adapter; with tenant_offload, tenants_per_step rows that the picked tenants are brought into."""
        if self.args.tenant_offload is None:
            return TenantPreftModel(base, config, self.tenant_names)
        return TenantPreftModel(base, config, [f"row{i}" for i in range(len(self._tenants_for_step(0)))])

    def _optimizer_param_groups(self) -> list[dict[str, Any]]:
        """One parameter group per tenant (with tenant_offload: per row, its learning rate set by the tenant it holds)."""
        if self.args.tenant_offload is not None:
            return [{"params": [p for _, p in self.preft_model.tenant(row).adapter_named_parameters()], "lr": 0.0}
                    for row in self.preft_model.tenant_names]
        return [{"params": [p for _, p in self.preft_model.tenant(task.name).adapter_named_parameters()], "lr": task.learning_rate}
                for task in self.tasks]

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> TenantSchedules:
        from transformers import get_scheduler

        args = self.args
        picks = [0] * len(self.tasks)  # steps each tenant trains in this run: its schedule's length
        for step in range(self.max_steps):
            for t in self._tenants_for_step(step):
                picks[t] += 1
        schedules = []
        for count in picks:  # transformers' schedule functions, each sized by its tenant's own optimizer steps
            steps = max(1, count * args.optimizer_steps_per_step)
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            schedules.append(get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=math.ceil(args.warmup_ratio * steps),
                                           num_training_steps=steps).lr_lambdas[0])
        rows = None if self.args.tenant_offload is None else [None] * len(optimizer.param_groups)
        return TenantSchedules(optimizer, schedules, [task.learning_rate for task in self.tasks], rows)

    # ------------------------------------------------------------------------------ which tenants, whose step
    def _tenants_for_step(self, step: int) -> list[int]:
        """Indices of the tenants trained at run step `step`, in tenant order. Picked per rollout: the steps that reuse
        one rollout (num_iterations > 1) train the tenants it was generated for."""
        if (found := _round_at(getattr(self, "_rounds", ()), step)) is not None:
            return list(found[2])  # every tenant of the round, every step of it
        count, k = len(self.tasks), self.args.tenants_per_step
        if k is None or k >= count:
            return list(range(count))
        generation = step // self.args.steps_per_generation
        if self.args.tenant_sampling == "random":
            return sorted(random.Random(self.args.seed * 1_000_003 + generation).sample(range(count), k))
        return sorted((generation * k + j) % count for j in range(k))

    def _data_step(self, tenant: int, step: int, tenant_step: int) -> int:
        """Which step of the tenant's dataset run step `step` reads: its own step, counted from the round's start in a
        round (each round brings a dataset of its own)."""
        found = _round_at(self._rounds, step)
        return tenant_step if found is None else tenant_step - found[3][tenant]

    def train_round(self, datasets: dict[str, Any], steps: int | None = None) -> dict[str, float]:
        """Train the named tenants on new rows (e.g. the traffic that came since the last round: traffic_dataset) from
        where the run is (adapters, AdamW state, step), every one of them in every step of the round; then checkpoint,
        save and push as `train()` ends. `steps` defaults to the fewest that give each row once (a tenant with fewer rows
        than the longest goes round its rows again). The online loop's round (docs/design/online.md). Needs
        lr_scheduler_type='constant' (the schedules are sized when the trainer is built)."""
        args = self.args
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) != "constant":
            raise ValueError(f"train_round needs lr_scheduler_type='constant', not {args.lr_scheduler_type!r}: rounds "
                             "keep coming, so no schedule can be sized in advance")
        if not isinstance(datasets, dict) or not datasets:
            raise ValueError("train_round needs {tenant name: dataset} for at least one tenant")
        unknown = sorted(set(datasets) - set(self.tenant_names))
        if unknown:
            raise ValueError(f"train_round: unknown tenants {unknown}; this run's tenants are {list(self.tenant_names)}")
        if args.tenants_per_step is not None and len(datasets) > args.tenants_per_step:
            raise ValueError(f"train_round with {len(datasets)} tenants but tenants_per_step={args.tenants_per_step}: a "
                             "round trains all its tenants in every step; give at most tenants_per_step per round")
        if self.step % args.steps_per_generation:
            raise ValueError(f"train_round at step {self.step}, inside a rollout reused for {args.steps_per_generation} "
                             "steps; finish it first (train())")
        checked = {}
        for name, dataset in datasets.items():
            task = self.tasks[self._tenant_index[name]]
            checked[name], *_ = resolve_task(dataset, task.reward_funcs, None, f"tenant {name!r} round dataset",
                                             type(self).__name__)
            self._check_traffic_rows(self._tenant_specs[self._tenant_index[name]], checked[name])
        local = args.generation_batch_size(1) // args.num_generations * self.accelerator.num_processes
        if steps is None:
            steps = max(math.ceil(len(d) / local) for d in checked.values()) * args.steps_per_generation
        if steps < 1 or steps % args.steps_per_generation:
            raise ValueError(f"train_round steps={steps} must be a positive multiple of steps_per_generation "
                             f"({args.steps_per_generation})")
        start = self.step
        picked = sorted(self._tenant_index[name] for name in checked)
        offsets = {t: self._tenant_step(t, start) for t in picked}
        for name, dataset in checked.items():
            self.tasks[self._tenant_index[name]].dataset = dataset
        self._rounds.append((start, start + steps, picked, offsets))
        self.max_steps = start + steps
        return self.train()

    def _checkpoint_json(self) -> dict[str, Any]:
        return {**super()._checkpoint_json(), "rounds": [[start, end, picked, {str(t): s for t, s in offsets.items()}]
                                                          for start, end, picked, offsets in self._rounds]}

    def _checkpoint_json_loaded(self, state: dict[str, Any]) -> None:
        super()._checkpoint_json_loaded(state)
        self._rounds = [(start, end, list(picked), {int(t): s for t, s in offsets.items()})
                        for start, end, picked, offsets in state.get("rounds", [])]
        self._pick_counts = [[0] * len(self.tasks)]  # recounted with the rounds

    def _tenant_step(self, tenant: int, step: int) -> int:
        """How many steps before run step `step` trained tenant `tenant`: the step its own single run would be at."""
        counts = self._pick_counts  # counts[s][t]: how many steps before s picked t, extended as steps come
        while len(counts) <= step:
            row = list(counts[-1])
            for t in self._tenants_for_step(len(counts) - 1):
                row[t] += 1
            counts.append(row)
        return counts[step][tenant]

    # ------------------------------------------------------------------------------ tenants in rows (tenant_offload)
    def _adapter(self, name: str) -> Any:
        """Tenant `name`'s adapter (adapter_named_parameters, adapter_state_dict, save_pretrained): its row's, or with
        tenant_offload and not in a row, the one it was last written back with."""
        if self._rows is None:
            return self.preft_model.tenant(name)
        if name in self._rows.tenants:
            return self.preft_model.tenant(self._rows.row_of(name))
        return StoredAdapter(self._rows.stored(name), self.preft_config, self.preft_model.base_model)

    def _resident_names(self) -> list[str]:
        """The tenants whose adapters are in the model (every tenant without tenant_offload)."""
        return list(self.tenant_names) if self._rows is None else list(self._rows)

    def _bring_in(self, step: int) -> None:
        """With tenant_offload: put step `step`'s tenants into the rows. A tenant leaving a row after training is
        first served by the engine (one prompt, as before a save), so only a policy that served is written back."""
        rows = self._rows
        if rows is None:
            return
        names = [self.tasks[t].name for t in self._tenants_for_step(step)]
        leaving = [name for name in rows if name not in names and name in self._unserved]
        if leaving:
            self._check_serves(leaving)
        loaded = rows.bring_in(names)
        self.scheduler.assign([None if name is None else self._tenant_index[name] for name in rows.tenants])
        if loaded:
            self._changed.update(rows.tenants[row] for row in loaded)
            self._engine_in_sync = False
            served = getattr(self, "_served_policy", None)
            if served is not None:  # what each loaded row is rolled back to: the version it was written back with (it served)
                per_row = len(served) // len(rows.tenants)
                for row in loaded:
                    for j, (_, param) in enumerate(rows.params(row)):
                        served[row * per_row + j] = param.detach().to("cpu", copy=True)

    def _build_engine(self, base: torch.nn.Module) -> Any:
        """With tenant_offload, the rows, their store and the first step's tenants come first: the engine starts with
        those tenants, in tenants_per_step slots."""
        args = self.args
        if args.tenant_offload is not None:
            from pathlib import Path

            root = Path(args.tenant_offload_dir or Path(args.output_dir) / TENANT_STATE_DIR) if args.tenant_offload == "disk" else None
            store = TenantStateStore(args.tenant_offload, root, self.accelerator.process_index)
            row_names = list(self.preft_model.tenant_names)
            initial = {KEY_PREFIX + key: p for key, p in self.preft_model.tenant(row_names[0]).adapter_named_parameters()}
            self._rows = TenantRows(row_names, self.preft_model.tenant, self.optimizer, store, initial)
            self._bring_in(0)
        return super()._build_engine(base)

    # ------------------------------------------------------------------------------ engine
    def _engine_adapter_states(self, changed_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        names = [name for name in self._resident_names() if not changed_only or name in self._changed]
        with gathered(self._policy_parameters(), self.accelerator):
            states = {name: self._copy_if_sharded(self._adapter(name).adapter_state_dict()) for name in names}
        self._changed -= set(names)
        return states

    def _sync_engine(self) -> None:
        """Push the tenants' adapters that changed (with tenant_offload: the engine holds the tenants in rows only)."""
        self._engine_put(self._engine_adapter_states(changed_only=True), keep=set(self._resident_names()))
        self._engine_in_sync = True

    def _engine_put(self, states: dict[str, dict[str, torch.Tensor]], keep: set[str]) -> None:
        """Add or update these adapters in the engine; with tenant_offload, first remove every adapter not in `keep`."""
        registered = self.engine.adapters
        if self._rows is not None:
            for name in registered:
                if name not in keep:
                    self.engine.remove_adapter(name)
        for name, state in states.items():
            if name in registered:
                self.engine.update_adapter(name, state)
            else:
                self.engine.add_adapter(name, state, config=self.preft_config)

    def _checkpoint_loaded(self) -> None:
        self._changed.update(self._resident_names())  # every adapter in the model was replaced
        super()._checkpoint_loaded()

    def _restore_last_served_policy(self) -> None:
        self._changed.update(self._resident_names())  # the engine must get the restored adapters back
        super()._restore_last_served_policy()

    def _check_serves(self, names: list[str]) -> None:
        """One prompt of each of these tenants (in rows) through the engine: a prefill and one token."""
        from preft_rl.engine import SamplingParams

        from .rollout import prompt_ids_for

        if not self._engine_in_sync:
            self._sync_engine()
        prompts = [prompt_ids_for(self.engine.tokenizer, self.tasks[self._tenant_index[name]].dataset[0]["prompt"],
                                  self.args.max_prompt_length) for name in names]
        self._engine_generate(prompts, [SamplingParams(max_tokens=1, temperature=0)] * len(prompts), adapters=list(names))
        self._unserved -= set(names)

    def _check_policy_serves(self) -> None:
        """One prompt per tenant in the model through the engine (a prefill and one token) before anything is written
        (with tenant_offload, the others were served before they left their rows)."""
        self._check_serves(self._resident_names())
        self._keep_served_policy()

    def _generate_and_score(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        import time

        start = time.perf_counter()
        self._bring_in(step)
        moves = time.perf_counter() - start
        batch, stats = super()._generate_and_score(step)
        if self._rows is not None:  # tenants written back and brought in (with their serve checks)
            stats["time/tenant_moves"] = moves
        return batch, stats

    # ------------------------------------------------------------------------------ rollout
    def _draw_groups(self, step: int, phases: PhaseRecorder) -> tuple[Samples, dict[str, float]]:
        """Every picked tenant's groups, generated in one engine call (each request with its tenant's adapter), scored
        by that tenant's reward functions. Rows are tenant-major; each tenant's rows are its alone run's rollout."""
        n = self.args.num_generations
        picked = self._tenants_for_step(step)
        prompts, params, adapters, columns, owners, all_rows, toolsets, layouts = [], [], [], [], [], [], [], []
        for t in picked:
            task, tenant_step = self.tasks[t], self._tenant_step(t, step)
            rows = self._prompts_for_step(self._data_step(t, step, tenant_step), 0, task.dataset)
            # a row from traffic with a served response and its feedback: n - 1 generated, the served one last
            fresh = [n - 1 if served_member(row) else n for row in rows]
            prompts += [row["prompt"] for row, k in zip(rows, fresh) for _ in range(k)]
            all_rows += [row for row, k in zip(rows, fresh) for _ in range(k)]
            toolsets += [self._tenant_toolsets[t]] * sum(fresh)
            params += self._sampling_params(tenant_step, 0, sum(fresh))
            adapters += [task.name] * sum(fresh)
            columns.append({k: [row[k] for row in rows for _ in range(n)] for k in rows[0] if k != "prompt"})
            owners.append((t, len(rows) * n))
            layouts.append((rows, fresh))
        with phases.phase("generate"):
            samples = self._with_served(self._generate(prompts, params, adapters=adapters, rows=all_rows, toolsets=toolsets),
                                        layouts)
        self._unserved -= {self.tasks[t].name for t in picked}
        tokens = sum(map(len, samples.completion_ids))
        errors_before = self._tenant_reward_errors()
        parts, start, stats_traffic = [], 0, {}
        self._reward_columns: dict[str, torch.Tensor] = {}
        with phases.phase("score"):
            for (t, size), cols in zip(owners, columns):
                task = self.tasks[t]
                part = samples.select(range(start, start + size))
                part.columns = cols
                if (environments := part.environments()) is not None:  # the tenant's own, as alone
                    cols = {**cols, "environments": environments}
                per_func = score(task.reward_funcs, task.reward_names, part.prompts, part.completions, part.completion_ids, cols)
                rewards = (per_func * task.reward_weights).nansum(dim=1)
                rewards[per_func.isnan().all(dim=1)] = math.nan
                served = self._served_positions(layouts[len(parts)][0])
                if served:  # a served response's reward is its user's feedback
                    rewards[list(served)] = torch.tensor(list(served.values()), dtype=rewards.dtype)
                    stats_traffic[task.name] = served
                for j, name in enumerate(task.reward_names):
                    self._reward_columns[f"tenants/{task.name}/rewards/{name}"] = per_func[:, j]
                part.rewards_per_func, part.rewards = rewards[:, None], rewards  # one column: tenants' functions differ
                part.columns = {}
                parts.append(part)
                start += size
        stats = {"rollout/draws": 1.0, "rollout/tokens_per_s": tokens / max(phases.seconds.get("generate", 0.0), 1e-9),
                 "tenants/picked": float(len(picked))}
        for key, count in self._tenant_reward_errors().items():
            stats[key] = float(count - errors_before[key])
        self._row_tenants = [self.tasks[t].name for t, size in owners for _ in range(size)]
        self._row_served = [i in self._served_positions(rows) for rows, _ in layouts
                            for i in range(len(rows) * n)]
        stats.update(self._traffic_stats(picked, layouts, stats_traffic))
        stats.update(self._tool_stats(samples))
        return Samples.concat(parts), stats

    # ------------------------------------------------------------------------------ traffic (preft_rl.traffic)
    def _served_positions(self, rows: list[dict]) -> dict[int, float]:
        """{position in the tenant's part: feedback reward} of its served responses (each last in its group)."""
        n = self.args.num_generations
        return {g * n + n - 1: float(row["served_reward"]) for g, row in enumerate(rows) if served_member(row)}

    def _with_served(self, samples: Samples, layouts: list[tuple[list[dict], list[int]]]) -> Samples:
        """The generated completions with each served response put last in its group (as it was served: its prompt ids,
        its sampled ids and the log-probs recorded then, which the importance weights compare with the policy's)."""
        if not any(served_member(row) for rows, _ in layouts for row in rows):
            return samples
        parts, at = [], 0
        for rows, fresh in layouts:
            for row, k in zip(rows, fresh):
                parts.append(samples.select(range(at, at + k)))
                at += k
                if served_member(row):
                    parts.append(self._served_sample(row))
        return Samples.concat(parts)

    def _served_sample(self, row: dict) -> Samples:
        from .rollout import completion_messages, prompt_ids_and_spans

        limit = self.args.max_completion_length
        ids, logps = list(row["served_completion_ids"])[:limit], list(row["served_logps"])[:limit]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        prompt_ids, spans = prompt_ids_and_spans(self.tokenizer, row["prompt"], self.args.max_prompt_length)
        return Samples([row["prompt"]], [prompt_ids], [ids], [logps], completion_messages([row["prompt"]], [text]),
                       prompt_spans=[spans] if spans else None)

    def _traffic_stats(self, picked: list[int], layouts: list[tuple[list[dict], list[int]]],
                       served: dict[str, dict[int, float]]) -> dict[str, float]:
        """Per tenant trained on traffic: its rows from traffic, those with a served response and feedback, and their
        staleness (versions behind the adapter trained when they were read)."""
        stats = {}
        for t, (rows, _) in zip(picked, layouts):
            if not rows or "traffic_id" not in rows[0]:
                continue
            name = self.tasks[t].name
            with_feedback = [row for row in rows if served_member(row)]
            stats[f"tenants/{name}/traffic/rows"] = float(len(rows))
            stats[f"tenants/{name}/traffic/feedback_rows"] = float(len(with_feedback))
            if with_feedback:
                stats[f"tenants/{name}/traffic/staleness"] = sum(r["served_staleness"] for r in with_feedback) / len(with_feedback)
                stats[f"tenants/{name}/traffic/feedback_reward"] = sum(served.get(name, {}).values()) / len(with_feedback)
        return stats

    def _tenant_reward_errors(self) -> dict[str, int]:
        return {f"tenants/{task.name}/rewards/{name}/errors": count for task in self.tasks
                for name, func in zip(task.reward_names, task.reward_funcs) if (count := reward_error_count(func)) is not None}

    def _pack(self, samples: Samples) -> RolloutBatch:
        batch = super()._pack(samples)
        batch.tenants = list(self._row_tenants)
        batch.served = list(self._row_served)
        return batch

    def _compute_advantages(self, batch: RolloutBatch) -> None:
        """Each tenant's advantages from its own rewards only (its groups, or its batch for 'batch' scaling)."""
        estimator = get_advantage_estimator(self.args.advantage_estimator)
        owner = torch.tensor([self._tenant_index[name] for name in batch.tenants])
        rewards, owners = self._gather(batch.rewards), self._gather(owner)
        advantages = torch.zeros_like(rewards)
        for t in owners.unique().tolist():
            rows = owners == t
            advantages[rows] = estimator(rewards[rows], self.args.num_generations, self.args.scale_rewards)
        batch.advantages = self._local_rows(advantages)

    # ------------------------------------------------------------------------------ update
    def _tenant_rows(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """{tenant: (rows,) its row indices in the batch}, in tenant order (a tenant's rows are consecutive)."""
        rows: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(batch.tenants):
            rows[name].append(i)
        return {name: torch.tensor(rows[name]) for name in self.tenant_names if name in rows}

    def _mini_batches(self, batch: RolloutBatch) -> list[list[Any]]:
        """Micro-batch j holds every tenant's j-th micro-batch of its own run (per_device_train_batch_size rows each)."""
        size = self.args.per_device_train_batch_size
        per_tenant = self._tenant_rows(batch)
        count = max(math.ceil(len(rows) / size) for rows in per_tenant.values())
        return [[torch.cat([rows[j * size : (j + 1) * size] for rows in per_tenant.values()]) for j in range(count)]]

    def _micro_parts(self, batch: RolloutBatch, rows: Any) -> list[Any]:
        """The micro-batch in pieces of tenants_per_forward tenants' rows (a tenant's rows stay together)."""
        chunk = self.args.tenants_per_forward
        rows = torch.as_tensor(rows)
        names = [batch.tenants[i] for i in rows.tolist()]
        owners = list(dict.fromkeys(names))
        if chunk is None or chunk >= len(owners):
            return [rows]
        groups = [set(owners[start : start + chunk]) for start in range(0, len(owners), chunk)]
        return [rows[torch.tensor([name in group for name in names])] for group in groups]

    def _row_kwargs(self, batch: RolloutBatch, rows: Any) -> dict[str, Any]:
        indices = range(len(batch.tenants))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        if self._rows is None:
            return {"tenants": [batch.tenants[i] for i in indices]}
        row_of = {name: self._rows.row_of(name) for name in self._rows}  # the model knows its rows, not the tenants
        return {"tenants": [row_of[batch.tenants[i]] for i in indices]}

    def _compute_loss(self, batch: RolloutBatch, rows: Any, mini: MiniBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """One forward over every tenant's rows; the loss is the sum of each tenant's own GRPO loss on its rows,
        normalised over its own tokens (as its single run would: num_items is that tenant's)."""
        device = self.accelerator.device
        mask = batch.completion_mask[rows].to(device).float()
        logps, entropy = self._completion_logps(batch, rows, with_entropy=True)
        old = batch.old_logps[rows].to(device) if batch.old_logps is not None else logps.detach()
        ref = None if batch.ref_logps is None else batch.ref_logps[rows].to(device)
        weights = self._importance_weights(batch, rows, old, mask)
        items = self._tenant_items(batch, mini)
        names = [batch.tenants[i] for i in rows.tolist()]
        total, stats = logps.new_zeros(()), defaultdict(float)
        for name in dict.fromkeys(names):
            sub = torch.tensor([i for i, owner in enumerate(names) if owner == name], device=device)
            out = self._policy_loss(logps[sub], old[sub], batch.advantages[rows][sub.cpu()].to(device), mask[sub],
                                    None if ref is None else ref[sub], None if weights is None else weights[sub],
                                    items[name], mini.num_micro_batches)
            total = total + out.loss
            stats[f"tenants/{name}/loss"] = out.loss.item()
            stats[f"tenants/{name}/clip_ratio"] = out.clip_ratio.item()
            served = torch.tensor([batch.served[rows[i].item()] for i in sub.tolist()], device=device)
            if weights is not None and served.any():  # the served responses' truncated importance weights
                w, m = weights[sub][served], mask[sub][served]
                stats[f"tenants/{name}/traffic/is_weight"] = ((w * m).sum() / m.sum().clamp(min=1)).item()
        if self.accelerator.num_processes > 1 and deepspeed_zero_stage(self.accelerator) is None:
            # DDP reduces in this backward only if every adapter is in its graph: a zero-weight term for each tenant not in
            # these rows (not picked, or in another piece) puts it there without changing any gradient
            present = set(names)
            for name in self._resident_names():
                if name not in present:
                    total = total + 0.0 * sum(p.sum() for _, p in self._adapter(name).adapter_named_parameters())
        stats["clip_ratio"] = sum(v for k, v in stats.items() if k.endswith("/clip_ratio")) / max(len(set(names)), 1)
        stats["entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        return total, dict(stats)

    def _tenant_items(self, batch: RolloutBatch, mini: MiniBatch) -> dict[str, float]:
        """{tenant: its completion tokens in this mini-batch over all processes / process count} (its num_items).
        Computed on every call: every process must reach the same all-reduce (a cache keyed by object identity could
        hit on one process and not on another, and the collectives would no longer match)."""
        acc = self.accelerator
        counts = torch.zeros(len(self.tenant_names), device=acc.device)
        for rows in mini.micro:
            for i in torch.as_tensor(rows).tolist():
                counts[self._tenant_index[batch.tenants[i]]] += float(batch.completion_mask[i].sum())
        counts = acc.reduce(counts, reduction="sum") / acc.num_processes
        return dict(zip(self.tenant_names, counts.tolist()))

    def _apply_gradients(self, norms: list[float]) -> None:
        """At the micro-batch that ends a mini-batch: clip each trained tenant's gradient by its own norm, skip a tenant
        whose gradient is not finite, step (AdamW skips parameters without a gradient: untrained tenants stay as they
        were), and advance the trained tenants' schedules."""
        args, acc = self.args, self.accelerator
        if deepspeed_zero_stage(acc) is not None:  # the engine stepped inside backward; clipping is off, every tenant trains
            if acc.sync_gradients:
                self.optimizer.step()
                self.scheduler.step(range(len(self.tasks)))
                self._changed.update(self.tenant_names)
                self._unpushed.update(self.tenant_names)
            self.optimizer.zero_grad(set_to_none=True)
            return
        if acc.sync_gradients:
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
            trained = []
            resident = set(self._resident_names())
            for t, task in enumerate(self.tasks):
                if task.name not in resident:  # with tenant_offload: not in the model, so nothing to step
                    continue
                params = [p for _, p in self._adapter(task.name).adapter_named_parameters() if p.grad is not None]
                if task.name not in self._step_tenants:  # not trained this step: no gradient (under DDP, the zeros of
                    for p in params:                      # its zero-weight term), so AdamW leaves it exactly as it is
                        p.grad = None
                    continue
                if not params:
                    continue
                norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                self._tenant_norms[task.name] = norm
                if math.isfinite(norm):
                    norms.append(norm)
                    trained.append(t)
                    self._changed.add(task.name)
                    self._unpushed.add(task.name)
                    if self._rows is not None:
                        self._rows.dirty.add(task.name)
                        self._unserved.add(task.name)
                else:  # this tenant's step is skipped; the others go on
                    for p in params:
                        p.grad = None
                    self._skipped_steps += 1
                    logger.warning("tenant %s: gradient norm is %s at step %d: its optimizer step skipped", task.name, norm,
                                   self.step + 1)
            self.optimizer.step()
            self.scheduler.step(trained)
        self.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, batch: RolloutBatch) -> dict[str, float]:
        self._bring_in(self.step)  # (already there unless a resumed run continues a saved rollout)
        self._tenant_norms: dict[str, float] = {}
        self._step_tenants = set(batch.tenants)  # the tenants this batch trains (the same on every process)
        out = super()._optimizer_step(batch)
        accumulation = self.args.gradient_accumulation_steps
        for key in [k for k in out if k.endswith("/loss") and k.startswith("tenants/")]:
            out[key] *= accumulation  # a share of the mini-batch loss, as the core scales 'loss'
        out.update({f"tenants/{name}/grad_norm": norm for name, norm in self._tenant_norms.items()})
        lrs = {name: self.scheduler.lr_of(self._tenant_index[name]) for name in self.tenant_names if name in self._step_tenants}
        out.update({f"tenants/{name}/learning_rate": lr for name, lr in lrs.items()})
        out["learning_rate"] = sum(lrs.values()) / max(len(lrs), 1)  # over the tenants this step trained
        return out

    # ------------------------------------------------------------------------------ metrics, saving
    def _rollout_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        rewards, lengths = batch.rewards, batch.completion_lengths.float()
        metrics = {"reward": torch.nanmean(rewards).item(), "completions/mean_length": lengths.mean().item(),
                   "completions/clipped_ratio": batch.truncated.float().mean().item()}
        for name, rows in self._tenant_rows(batch).items():
            tenant_rewards = rewards[rows]
            metrics[f"tenants/{name}/reward"] = torch.nanmean(tenant_rewards).item()
            metrics[f"tenants/{name}/reward_std"] = nanstd(tenant_rewards).item() if (~tenant_rewards.isnan()).sum() > 1 else 0.0
            metrics[f"tenants/{name}/completions/mean_length"] = lengths[rows].mean().item()
        for key, column in getattr(self, "_reward_columns", {}).items():
            metrics[key + "/mean"] = torch.nanmean(column).item()
        return metrics

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        raise NotImplementedError("evaluate() is not supported with tenants=: use tenant_evaluation_scores({name: dataset})")

    def evaluation_scores(self, *args: Any, **kwargs: Any) -> dict[str, list]:
        return self.evaluate()

    def tenant_evaluation_scores(self, datasets: dict[str, Any], reward_funcs: dict[str, Sequence[Callable]] | None = None
                                 ) -> dict[str, dict[str, list]]:
        """Greedy held-out scores per tenant, every tenant's problems in one engine call with its own adapter:
        {tenant: {reward name: [score per problem], "completion_length": [...], "completion": [text]}} for the tenants
        in `datasets` ({tenant: dataset with a 'prompt' column}), scored by `reward_funcs[tenant]` (default: the
        tenant's own training rewards). Before training every adapter is a no-op, so these are the base model's."""
        from .evaluation import EvalJob, evaluate_jobs

        unknown = [name for name in list(datasets) + list(reward_funcs or {}) if name not in self.tenant_names]
        if unknown:
            raise ValueError(f"unknown tenant(s) {unknown}; this trainer's tenants are {list(self.tenant_names)}")
        jobs = []
        for name, dataset in datasets.items():
            task = self.tasks[self.tenant_names.index(name)]
            if reward_funcs is not None and name in reward_funcs:
                funcs = list(reward_funcs[name])
                names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)]
            else:
                funcs, names = task.reward_funcs, task.reward_names
            jobs.append(EvalJob(dataset, funcs, names, adapter=name, toolset=self._tenant_toolsets[self.tenant_names.index(name)]))
        if self._rows is None:
            return dict(zip(datasets, evaluate_jobs(self, jobs)))
        # with tenant_offload the engine has a slot per row: the tenants go through it that many at a time
        results, size, names = {}, len(self._rows.tenants), list(datasets)
        try:
            for start in range(0, len(names), size):
                chunk = names[start : start + size]
                if not self._engine_in_sync:
                    self._sync_engine()  # the rows' tenants, checked against the engine as before any evaluation
                with gathered(self._policy_parameters(), self.accelerator):
                    states = {name: self._adapter(name).adapter_state_dict() for name in chunk}
                self._engine_put(states, keep=set(chunk))
                results.update(zip(chunk, evaluate_jobs(self, jobs[start : start + size])))
        finally:  # the engine holds other tenants now: the next rollout puts the rows' tenants back
            self._changed.update(self._resident_names())
            self._engine_in_sync = False
        return results

    def save_model(self, output_dir: Any = None) -> None:
        """Write every tenant's adapter to <output_dir>/tenants/<name>/ (adapter_config.json + adapter_model.safetensors)."""
        from pathlib import Path

        root = Path(output_dir or self.args.output_dir) / TENANTS_DIR
        with gathered(self._policy_parameters(), self.accelerator):
            if self.accelerator.is_main_process:
                for name in self.tenant_names:
                    self._adapter(name).save_pretrained(root / name)
        self.accelerator.wait_for_everyone()

    def _served_adapter_dirs(self, root: Any) -> dict[str, Any]:
        """The tenants trained since their last successful push (each its folder under root/tenants/)."""
        return {name: root / TENANTS_DIR / name for name in self.tenant_names if name in self._unpushed}

    def _pushed(self, versions: dict[str, int | None]) -> None:
        self._unpushed -= {name for name, version in versions.items() if version is not None}
        self.served_versions.update({name: version for name, version in versions.items() if version is not None})

    def _checkpoint_adapter_files(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        if self._rows is not None:  # the tenants' state folder carries every adapter (the rows hold whoever was picked)
            return {}
        return {f"{TENANTS_DIR}/{name}/{WEIGHTS_NAME}": {KEY_PREFIX + key: p for key, p in self.preft_model.tenant(name).adapter_named_parameters()}
                for name in self.tenant_names}

    # ------------------------------------------------------------------------------ checkpoints with tenant_offload
    def _checkpoint_extra_dir(self) -> str | None:
        return None if self._rows is None else TENANT_STATE_DIR

    def _save_checkpoint_extra(self, directory: Any) -> None:
        """Every trained tenant's adapter and AdamW state (rows written back first), one file each."""
        self._rows.flush()
        if self.accelerator.is_main_process:
            self._rows.store.save_to(directory)

    def _read_checkpoint_extra(self, directory: Any) -> Any:
        expected = dict(self._rows.params(0))  # {file key: a row's parameter}: the shapes every tenant's entry has

        def check(name: str, tensors: dict[str, torch.Tensor]) -> None:
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise ValueError(f"tenant {name!r}: adapter tensors {missing[:3]} are missing")
            for key, value in tensors.items():
                state_name, _, param_key = key.rpartition(STATE_SEPARATOR)
                param = expected.get(param_key)
                if param is None or state_name not in ("", "step", "exp_avg", "exp_avg_sq"):
                    raise ValueError(f"tenant {name!r}: unexpected tensor {key!r} (saved for another adapter or optimizer)")
                if state_name != "step" and value.shape != param.shape:
                    raise ValueError(f"tenant {name!r}: {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"tenant {name!r}: {key} has non-finite values")

        return directory, read_checkpoint_entries(directory, set(self.tenant_names), check, keep=self._rows.store.kind == "cpu")

    def _apply_checkpoint_extra(self, read: Any) -> None:
        """The checkpoint's store replaces this one; the rows are emptied (the next step brings its tenants in)."""
        directory, entries = read
        self._rows.store.load_from(directory, entries)
        self._rows.clear()
        self.scheduler.assign([None] * len(self._rows.tenants))
        self._unserved = set()

