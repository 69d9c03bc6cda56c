"""The one place that knows adapter tensor names: the file-key format and PEFT's target-name matching.

File keys are `base_model.model.<parameter path inside the HF causal LM>`, as PEFT writes them: LoRA keys are
exactly PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`); an adapter that acts after a
decoder layer keeps its tensors under that layer (`base_model.model.model.layers.3.preft_reft.interventions.shared.
learned_source.weight`). save_pretrained, from_pretrained, checkpoints and the engine's add/update all use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

KEY_PREFIX = "base_model.model."
LAYERS_PATH = "model.layers"  # where a supported causal LM keeps its decoder layers
_LAYER_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)$")


def file_key(parameter_path: str) -> str:
    """'model.layers.0.mlp.down_proj.lora_A.weight' -> 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'."""
    return KEY_PREFIX + parameter_path


def layer_key(layer: int, path_in_layer: str) -> str:
    """The file key of a tensor at `path_in_layer` inside decoder layer `layer`."""
    return f"{KEY_PREFIX}{LAYERS_PATH}.{layer}.{path_in_layer}"


def split_layer_key(key: str) -> tuple[int, str] | None:
    """(decoder layer, path inside it) of a file key under the decoder layers; None for any other key.

    >>> split_layer_key("base_model.model.model.layers.12.self_attn.q_proj.lora_B.weight")
    (12, 'self_attn.q_proj.lora_B.weight')
    """
    match = _LAYER_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def module_path(layer: int, path_in_layer: str) -> str:
    """The full module path PEFT matches target names against: 'model.layers.<layer>.<path_in_layer>'."""
    return f"{LAYERS_PATH}.{layer}.{path_in_layer}"


def names_target(path: str, target: str) -> bool:
    """PEFT's rule for one entry of a target list: the full module path equals it or ends in '.' + it."""
    return path == target or path.endswith("." + target)


def matching_targets(path: str, targets: Iterable[str]) -> list[str]:
    """The entries of a target list that name the module at `path` (PEFT's list rule)."""
    return [target for target in targets if names_target(path, target)]


def peft_match(spec: str | list[str] | None, path: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a str is a regex that must match the whole path; a list
    is matched entry by entry with `names_target`."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(names_target(path, t) for t in spec)


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
    return [name for name in module_names if peft_match(target_modules, name) and not peft_match(exclude_modules, name)]


def lora_module_names(keys: Iterable[str]) -> list[str]:
    """The full paths of the modules that file keys hold LoRA tensors for (in order, once each)."""
    names = (k[len(KEY_PREFIX):].split(".lora_")[0] for k in keys if k.startswith(KEY_PREFIX) and ".lora_" in k)
    return list(dict.fromkeys(names))
