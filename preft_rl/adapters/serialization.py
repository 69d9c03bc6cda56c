"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Key format (shared by save_pretrained, from_pretrained and the engine's update_adapter):
`base_model.model.<parameter path inside the HF causal LM>`, as PEFT writes it. LoRA keys are exactly
PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). ReFT keys live under the
decoder layer they follow (`base_model.model.model.layers.3.preft_reft.interventions.shared.<param>`).
LoReFT's orthogonal R is written materialised as `...rotate_layer.weight` (what an engine uses) next to
its free parameter `...rotate_layer.raw`, from which a reload recomputes R with the same op on the same
values, so a save/load round trip is bit-exact (and checked against the saved R).

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
from .layers import orthonormal_rows

if TYPE_CHECKING:
    from .model import PreftModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


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
    if model.preft_config.method == "loreft":
        for name, module in model.adapter_named_modules():
            if name.endswith(".rotate_layer"):
                state[f"{KEY_PREFIX}{name}.weight"] = module.weight.detach().contiguous()
    return state


def _zero3_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose data currently lives in shards on the ranks (ds_status NOT_AVAILABLE)."""
    status = getattr(param, "ds_status", None)
    return status is not None and getattr(status, "name", "") == "NOT_AVAILABLE"


def load_adapter_state_dict(model: PreftModel, state: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
    """Copy file-format tensors into `model`'s adapter after checking all of them (a refused state changes nothing)."""
    expected = {KEY_PREFIX + name: p for name, p in model.adapter_named_parameters()}
    _copy(expected, check_adapter_state(expected, state, source))


def load_into_modules(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], source: str) -> None:
    """Like load_adapter_state_dict, for adapter modules not yet attached: {name inside the base model: module}."""
    from .model import _is_adapter_name

    expected = {
        f"{KEY_PREFIX}{prefix}.{name}": p
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if _is_adapter_name(f"{prefix}.{name}")
    }
    _copy(expected, check_adapter_state(expected, state, source))


def check_adapter_state(expected: dict[str, torch.Tensor], state: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` for the `expected` parameters, after checking names, types, shapes, finite values
    and (LoReFT) that each saved rotation equals the one recomputed from its free parameter. Changes nothing."""
    if not isinstance(state, dict):
        raise TypeError(f"adapter tensors from {source} must be a dict of tensors, got {type(state).__name__}")
    rotations = {k: v for k, v in state.items() if k.endswith(".rotate_layer.weight")}
    given = {k: v for k, v in state.items() if k not in rotations}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected)) + sorted(k for k in rotations if k[: -len("weight")] + "raw" not in expected)
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
    for key, saved in rotations.items():
        raw_key = key[: -len("weight")] + "raw"
        recomputed = orthonormal_rows(given[raw_key].detach().to("cpu", torch.float32))
        if saved.shape != recomputed.shape:
            raise ValueError(
                f"saved rotation {key} in {source} has shape {tuple(saved.shape)} but {raw_key} gives "
                f"{tuple(recomputed.shape)}; the adapter file is inconsistent"
            )
        saved = saved.detach().to("cpu", torch.float32)
        if not torch.allclose(saved, recomputed, atol=1e-5, rtol=1e-5):
            raise ValueError(
                f"saved rotation {key} in {source} does not match the one recomputed from {raw_key} "
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
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules if cfg.is_lora else None,
        "layers": cfg.layers if not cfg.is_lora else None,
        "positions": cfg.positions,
        "share_first_last": cfg.share_first_last,
        "init_scale": cfg.init_scale,
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
        return PreftConfig(
            adapter_scope=scope,
            method=raw.get("method"),
            r=raw.get("r"),
            alpha=raw.get("lora_alpha"),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw.get("target_modules") or "all-linear",
            layers=raw.get("layers") or "all",
            positions=raw.get("positions", "all"),
            share_first_last=raw.get("share_first_last", True),
            init_scale=raw.get("init_scale"),
        )
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


def peft_lora_targets(target_modules: Any, exclude_modules: Any, module_names: Iterable[str]) -> str | list[str]:
    """The modules PEFT adapts for these LoraConfig fields, by PEFT's rule: a str is a regex that must match a
    whole module path; a list entry matches a path equal to it or ending in '.' + entry (so 'q_proj',
    'self_attn.q_proj' and 'model.layers.0.self_attn.q_proj' all name layer 0's q_proj); `exclude_modules`
    (same rule) removes modules. A plain list or "all-linear" is returned as is (PreftModel matches a list by
    the same rule); a regex or an exclusion is resolved against `module_names` into the paths it selects.

    >>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    >>> peft_lora_targets(["q_proj"], None, names)
    ['q_proj']
    >>> peft_lora_targets(["q_proj", "v_proj"], ["model.layers.1.self_attn.q_proj"], names)
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    >>> peft_lora_targets(r".*\\.layers\\.0\\..*", ["v_proj"], names)
    ['model.layers.0.self_attn.q_proj']
    """
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear" and not exclude_modules:
        return "all-linear"  # PreftConfig's spelling of the same set
    if isinstance(target_modules, (list, tuple)) and not exclude_modules and all(isinstance(t, str) and t for t in target_modules):
        return list(target_modules)  # PreftModel matches a list by the same rule (and an engine can check it by name)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        raise ValueError(
            f"PEFT target_modules='all-linear' with exclude_modules={exclude_modules!r} cannot be resolved here; "
            "list the target modules in adapter_config.json instead (PEFT's save_pretrained writes that list)"
        )
    for field, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if value is not None and not isinstance(value, (str, list, tuple)):
            raise ValueError(f"PEFT {field}={value!r} must be a regex string or a list of module names")
    return [name for name in module_names if _peft_match(target_modules, name) and not _peft_match(exclude_modules, name)]


def _peft_match(spec: str | list[str] | None, name: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def lora_module_names(keys: Iterable[str]) -> list[str]:
    """The full paths of the modules that file keys hold LoRA tensors for (in order, once each)."""
    names = (k[len(KEY_PREFIX):].split(".lora_")[0] for k in keys if k.startswith(KEY_PREFIX) and ".lora_" in k)
    return list(dict.fromkeys(names))


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
