"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Key format: see keys.py (shared by save_pretrained, from_pretrained, checkpoints and the engine's add/update). LoRA
keys are exactly PEFT's. A method's derived tensors (LoReFT's orthogonal R, `...rotate_layer.weight`) are written
materialised next to the free parameter they come from (`...rotate_layer.raw`), so an engine can use them directly; a
reload recomputes them with the same op on the same values, so a round trip is bit-exact (and checked against the file).

The config carries `"prefill_only": true` and `"peft_type": "PREFT"`: PEFT itself refuses the
directory instead of silently loading it as an all-token LoRA.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import PreftConfig
from .keys import KEY_PREFIX, lora_module_names, peft_lora_targets
from .methods import METHOD_FIELDS, get_method, method_names

if TYPE_CHECKING:
    from .model import PreftModel

# A name `preft-rl serve` serves an adapter under (the model field of a request; the trainer's push checks it first).
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
# adapter_config.json names of PreftConfig fields (PEFT's spelling where PEFT has the field)
_FILE_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def adapter_state_dict(model: PreftModel) -> dict[str, torch.Tensor]:
    """Every adapter tensor under its file key (detached, contiguous, fp32)."""
    partitioned = [name for name, p in model.adapter_named_parameters() if _zero3_partitioned(p)]
    if partitioned:
        raise RuntimeError(
            f"adapter_state_dict(): {len(partitioned)} adapter parameters (e.g. {partitioned[0]!r}) are DeepSpeed "
            "ZeRO-3 shards, so this would return empty tensors. Call it on every rank inside "
            "`deepspeed.zero.GatheredParameters(params)` (params from adapter_named_parameters()), or use "
            "PreftGRPOTrainer.save_model(), which gathers for you."
        )
    state = {}
    for name, param in model.adapter_named_parameters():
        state[KEY_PREFIX + name] = param.detach().contiguous()
    for derived, (source, compute) in model.preft_config.method_spec.derived_tensors().items():
        for key in [k for k in state if k.endswith("." + source)]:
            with torch.no_grad():
                state[key[: -len(source)] + derived] = compute(state[key]).detach().contiguous()
    return state


def _zero3_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose data currently lives in shards on the ranks (ds_status NOT_AVAILABLE)."""
    status = getattr(param, "ds_status", None)
    return status is not None and getattr(status, "name", "") == "NOT_AVAILABLE"


def load_adapter_state_dict(model: PreftModel, state: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
    """Copy file-format tensors into `model`'s adapter after checking all of them (a refused state changes nothing)."""
    expected = {KEY_PREFIX + name: p for name, p in model.adapter_named_parameters()}
    _copy(expected, check_adapter_state(expected, state, source, model.preft_config))


def load_into_modules(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], source: str, config: PreftConfig) -> None:
    """Like load_adapter_state_dict, for adapter modules not yet attached: {name inside the base model: module}."""
    from .model import _is_adapter_name

    expected = {
        f"{KEY_PREFIX}{prefix}.{name}": p
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if _is_adapter_name(f"{prefix}.{name}")
    }
    _copy(expected, check_adapter_state(expected, state, source, config))


def check_adapter_state(expected: dict[str, torch.Tensor], state: Any, source: str,
                        config: PreftConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `state` for the `expected` parameters, after checking names, types, shapes, finite values
    and that each derived tensor (LoReFT's R) equals the one recomputed from its parameter (those of `config`'s
    method; without a config, of any registered method). Changes nothing."""
    if not isinstance(state, dict):
        raise TypeError(f"adapter tensors from {source} must be a dict of tensors, got {type(state).__name__}")
    methods = [config.method_spec] if config is not None else [get_method(name) for name in method_names()]
    derivations = {suffix: rule for method in methods for suffix, rule in method.derived_tensors().items()}
    derived = {}  # file key -> (parameter key, function)
    for key in state:
        for suffix, (source_suffix, compute) in derivations.items():
            if key.endswith("." + suffix):
                derived[key] = (key[: -len(suffix)] + source_suffix, compute)
    given = {k: v for k, v in state.items() if k not in derived}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected)) + sorted(k for k, (param_key, _) in derived.items() if param_key not in expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors in {source} do not match this model's adapter: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "was it saved for another base model, method, target_modules or layers?"
        )
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"adapter tensor {key} in {source} is a {type(tensor).__name__}; pass torch tensors (torch.as_tensor(x))")
        if not tensor.is_floating_point():
            raise TypeError(f"adapter tensor {key} in {source} has dtype {tensor.dtype}; adapter weights are floating point "
                            "(an integer tensor would be loaded silently rounded): pass the float tensors the adapter was saved with")
    wrong = [(k, tuple(given[k].shape), tuple(p.shape)) for k, p in expected.items() if given[k].shape != p.shape]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(
            f"adapter tensor {key} has shape {got} but this model needs {want} ({len(wrong)} tensors differ, in {source}); "
            "the adapter was saved for a different base model or rank"
        )
    non_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise ValueError(
            f"adapter tensor {non_finite[0]} has non-finite values (NaN or inf) in {source} ({len(non_finite)} such tensors); "
            "the adapter is broken (e.g. training diverged): use an earlier checkpoint or retrain"
        )
    for key, (param_key, compute) in derived.items():
        with torch.no_grad():
            recomputed = compute(given[param_key].detach().to("cpu", torch.float32))
        saved = state[key]
        if saved.shape != recomputed.shape:
            raise ValueError(
                f"saved {key} in {source} has shape {tuple(saved.shape)} but {param_key} gives "
                f"{tuple(recomputed.shape)}; the adapter file is inconsistent"
            )
        saved = saved.detach().to("cpu", torch.float32)
        if not torch.allclose(saved, recomputed, atol=1e-5, rtol=1e-5):
            raise ValueError(
                f"saved {key} in {source} does not match the one recomputed from {param_key} "
                f"(max diff {(saved - recomputed).abs().max().item():.3g}); the adapter file is inconsistent"
            )
    return given


def _copy(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(given[key].to(device=param.device, dtype=param.dtype))


def save_adapter(model: PreftModel, save_directory: str | os.PathLike) -> None:
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained({str(save_directory)!r}): that path is a file; pass a directory (it is created "
                         "if missing)")
    state = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    non_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if non_finite:  # checked before anything is written: a previous save in this directory stays as it was
        raise ValueError(
            f"adapter tensor {non_finite[0]} has non-finite values (NaN or inf) ({len(non_finite)} such tensors); "
            f"not written to {directory}. Training diverged: resume from an earlier checkpoint, e.g. with a lower "
            "learning_rate or max_grad_norm"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.preft_config
    base_config = model.base_model.config
    config = {
        "peft_type": "PREFT",
        "prefill_only": cfg.prefill_only,  # False only for the all-token baseline (adapter_scope="all")
        "adapter_scope": cfg.adapter_scope,
        "method": cfg.method,
        "r": cfg.r,
        # the fields this method reads; the others are written as null
        **{_FILE_NAMES.get(f, f): (getattr(cfg, f) if f in cfg.method_spec.fields else None) for f in METHOD_FIELDS},
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "base_model_config": {field: getattr(base_config, field, None) for field in _BASE_FIELDS},
        "preft_rl_version": _version(),
    }
    # Write to temporary names and rename, so a crash never leaves a half-written adapter.
    tmp_config, tmp_weights = directory / (CONFIG_NAME + ".tmp"), directory / (WEIGHTS_NAME + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated: save the adapter again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object; save the adapter again")
    return raw


class PlainPeftLoraError(ValueError):
    """A plain PEFT LoRA directory given where a prefill-only adapter was expected, without the explicit opt-in."""


def read_adapter_config(
    adapter_dir: str | os.PathLike, load_peft_lora_as_prefill_only: bool = False, module_names: Iterable[str] | None = None
) -> PreftConfig:
    """The PreftConfig of a saved adapter directory (a PEFT LoRA directory only when allowed).

    A PEFT LoRA's targets are resolved with PEFT's own rule (see `peft_lora_targets`) into the full paths of
    the modules it adapts, against `module_names` (every module name of the base model, e.g.
    'model.layers.0.self_attn.q_proj'), or, without a base model (an engine), against the modules its
    weights file has LoRA tensors for.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}; pass a directory written by PreftModel.save_pretrained")
    raw: dict[str, Any] = _read_config_json(path)
    if raw.get("prefill_only") is True or raw.get("peft_type") == "PREFT":
        scope = raw.get("adapter_scope", "prompt")
        if raw.get("prefill_only") is not (scope == "prompt"):
            raise ValueError(
                f"{path}: \"prefill_only\": {raw.get('prefill_only')!r} contradicts \"adapter_scope\": {scope!r}; "
                "the file was edited by hand or is corrupt: save the adapter again with PreftModel.save_pretrained"
            )
        method = raw.get("method")
        try:
            spec = get_method(method)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        # only the fields this method reads (files of older versions wrote every field)
        fields = {f: raw[_FILE_NAMES.get(f, f)] for f in spec.fields if raw.get(_FILE_NAMES.get(f, f)) is not None}
        return PreftConfig(adapter_scope=scope, method=method, r=raw.get("r"), **fields)
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{path} is not a prefill-only adapter (no \"prefill_only\": true) and not a PEFT LoRA "
            f"(peft_type={raw.get('peft_type')!r}); pass a directory written by PreftModel.save_pretrained"
        )
    if not load_peft_lora_as_prefill_only:
        raise PlainPeftLoraError(
            f"{adapter_dir} is a plain PEFT LoRA, trained to act on every token; loading it as prefill-only "
            "changes what it does. If that is what you want, pass load_peft_lora_as_prefill_only=True to "
            "PreftModel.from_pretrained or PreftEngine.add_adapter"
        )
    unsupported = {key: raw[key] for key in _UNSUPPORTED_PEFT_OPTIONS if raw.get(key)}
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]
    if unsupported:
        raise ValueError(
            f"{path}: PEFT LoRA options {unsupported} are not supported by prefill-only LoRA; retrain without them "
            "(plain LoRA on linear layers: bias='none', no DoRA/rsLoRA, one rank and alpha for every module)"
        )
    target, exclude = raw.get("target_modules"), raw.get("exclude_modules")
    if module_names is None and (isinstance(target, str) or exclude):  # only a regex or an exclusion needs the names
        module_names = lora_module_names(_weight_keys(Path(adapter_dir) / WEIGHTS_NAME))
    targets = peft_lora_targets(target, exclude, module_names or [])
    if not targets:
        raise ValueError(
            f"{path}: PEFT target_modules={target!r} (exclude_modules={exclude!r}) "
            "match no module of this base model; load it onto the base model it was trained on"
        )
    return PreftConfig(method="lora", r=raw["r"], alpha=raw.get("lora_alpha", raw["r"]), dropout=0.0, target_modules=targets)


# PEFT LoraConfig fields that change what the adapter computes or where it acts, beyond plain LoRA on linear layers.
_UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layers_pattern",
    "lora_bias", "use_qalora", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
    "layer_replication", "fan_in_fan_out", "megatron_config", "arrow_config",
)


def _weight_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}; pass a directory written by save_pretrained")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} cannot be read ({exc}); the file is truncated or corrupt: save the adapter again") from exc


def load_adapter(
    cls: type[PreftModel],
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    is_trainable: bool,
    load_peft_lora_as_prefill_only: bool,
) -> PreftModel:
    module_names = [name for name, _ in model.named_modules() if name]
    config = read_adapter_config(adapter_dir, load_peft_lora_as_prefill_only, module_names)
    raw = _read_config_json(Path(adapter_dir) / CONFIG_NAME)
    saved_base = raw.get("base_model_config") or {}
    for field in _BASE_FIELDS:
        want, have = saved_base.get(field), getattr(model.config, field, None)
        if want is not None and want != have:
            raise ValueError(
                f"adapter in {adapter_dir} was saved for a base model with {field}={want}, but this model has "
                f"{field}={have}; load it onto the base model it was trained on "
                f"({raw.get('base_model_name_or_path') or 'see base_model_config in adapter_config.json'})"
            )
    weights = Path(adapter_dir) / WEIGHTS_NAME
    state = read_weights(weights)
    # Everything is checked before the adapter is attached: a refused directory leaves `model` as it was.
    preft = cls(model, config, adapter_state=state, adapter_source=str(weights))
    for _, param in preft.adapter_named_parameters():
        param.requires_grad_(is_trainable)
    preft.train(is_trainable)
    return preft


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors file, with an error naming the file if it is absent or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}; pass a directory written by PreftModel.save_pretrained")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} cannot be read ({exc}); the file is truncated or corrupt: save the adapter again") from exc


def _version() -> str:
    from preft_rl import __version__

    return __version__
