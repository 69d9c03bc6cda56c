"""The contract of preft-rl's vLLM surface: every vLLM item the compat layer touches is where it expects it.

`vllm_compat.SURFACE` and `vllm_compat_serve.SURFACE` list each vLLM item (a function and its parameters, a class, a
method that is patched, a field that is read, a module global that is written) with the preft-rl function that uses
it. Here each one is checked against the installed vLLM, and a miss fails as
"vLLM <version> moved <item> (used by <preft-rl function>): <what is wrong>; update that function".
The tests at the end remove items on purpose, to show that every kind of check can fail.
Beside the table: vLLM's fused module names (`FUSED_LINEAR_MODULES`), the decoder layer's (hidden, residual) output,
the custom-op registration, the model registry and the request tag, checked by behaviour.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
import vllm  # noqa: E402

from preft_rl.engine import vllm_compat, vllm_compat_serve  # noqa: E402
from preft_rl.engine.vllm_compat import LIVE_ROOTS, VllmItem  # noqa: E402

SURFACE = vllm_compat.SURFACE + vllm_compat_serve.SURFACE
STATIC = [item for item in SURFACE if item.path.partition(":")[0] not in LIVE_ROOTS]
LIVE = [item for item in SURFACE if item.path.partition(":")[0] in LIVE_ROOTS]
REPO = Path(__file__).resolve().parents[1]


class _Gone:
    """Stands in for a vLLM item that moved: no attributes, not callable, equal to nothing."""

    __slots__ = ()


# ------------------------------------------------------------------------------ the checker
def _has_field(owner, name: str) -> bool:
    """An attribute, a dataclass / msgspec / pydantic field, or an annotation (Protocol members, TypedDict keys)."""
    if hasattr(owner, name):
        return True
    if dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
        return True
    if name in (getattr(owner, "__struct_fields__", None) or ()) or name in (getattr(owner, "model_fields", None) or {}):
        return True
    return any(name in getattr(klass, "__annotations__", {}) for klass in getattr(owner, "__mro__", ()))


def _check(item: VllmItem, roots: dict | None) -> None:
    root, _, qualname = item.path.partition(":")
    parts = qualname.split(".") if qualname else []
    if root in LIVE_ROOTS:
        if roots is None:
            pytest.skip("a live item: checked on a running engine")
        obj = roots[root]
    else:
        obj = importlib.import_module(root)
    if item.kind == "source":
        source = inspect.getsource(obj)
        assert item.value in source, f"its source no longer contains {item.value!r}"
        return
    leaf = parts.pop() if item.kind in ("attribute", "init attribute") else None
    for part in parts:
        assert hasattr(obj, part), f"{type(obj).__name__ if not inspect.isclass(obj) else obj.__name__} has no {part!r}"
        obj = getattr(obj, part)
    if item.kind == "attribute":
        assert _has_field(obj, leaf), f"no attribute or field {leaf!r}"
    elif item.kind == "init attribute":
        if dataclasses.is_dataclass(obj) and leaf in {f.name for f in dataclasses.fields(obj)}:
            return
        assert inspect.isclass(obj), f"{obj!r} is not a class"
        source = inspect.getsource(obj.__init__)
        assert re.search(rf"self\.{leaf}\s*(:[^=\n]+)?=", source), f"{obj.__name__}.__init__ no longer sets self.{leaf}"
    elif item.kind == "value":
        assert obj == item.value, f"is {obj!r}, expected {item.value!r}"
    elif item.kind == "keys":
        keys = set(getattr(obj, "__annotations__", {}))
        assert set(item.value) <= keys, f"takes no {sorted(set(item.value) - keys)}"
    elif item.kind == "class":
        assert inspect.isclass(obj), f"is {type(obj).__name__}, not a class"
        missing = [p for p in item.params if not _has_field(obj, p)]
        assert not missing, f"has no field(s) {missing}"
    elif item.kind in ("callable", "async generator"):
        assert callable(obj) and not inspect.isclass(obj), f"is {type(obj).__name__}, not a function"
        if item.kind == "async generator":
            assert inspect.isasyncgenfunction(obj), "is no longer an async generator function"
        names = list(inspect.signature(obj).parameters)
        missing = [p for p in item.params if p not in names]
        assert not missing, f"takes no parameter(s) {missing} (its parameters: {names})"
    else:
        raise AssertionError(f"unknown kind {item.kind!r} in the compat table")


def check_item(item: VllmItem, roots: dict | None = None) -> None:
    """Raise an AssertionError naming the vLLM item and the preft-rl function if the installed vLLM breaks the item."""
    try:
        _check(item, roots)
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # an ImportError, AttributeError or AssertionError: all mean the same to the maintainer
        detail = exc.args[0] if isinstance(exc, AssertionError) and exc.args else f"{type(exc).__name__}: {exc}"
        raise AssertionError(f"vLLM {vllm.__version__} moved {item.path} (used by {item.used_by}): {detail}; "
                             "update that function") from None


# ------------------------------------------------------------------------------ the table, against the installed vLLM
@pytest.mark.parametrize("item", STATIC, ids=lambda item: item.path)
def test_vllm_item_is_where_the_compat_layer_expects_it(item):
    check_item(item)


def test_live_engine_state_is_where_the_compat_layer_expects_it(engines):
    engine = engines("lora")
    runner = engine._runner
    roots = {"llm": engine.llm, "runner": runner, "model": runner.model,
             "worker": engine.llm.llm_engine.model_executor.driver_worker.worker}
    for item in LIVE:
        check_item(item, roots)


def test_every_vllm_import_of_the_compat_modules_is_in_the_table():
    """A new vLLM import in a compat module without a SURFACE row would go unchecked."""
    listed = {f"{item.path.partition(':')[0]}.{item.path.partition(':')[2].split('.')[0]}" for item in SURFACE}
    for module in (vllm_compat, vllm_compat_serve):
        source = inspect.getsource(module)
        for found in re.finditer(r"^\s*from (vllm[\w.]*) import ([\w, ]+)$", source, re.M):
            for name in (n.strip() for n in found.group(2).split(",")):
                assert f"{found.group(1)}.{name}" in listed, (
                    f"{module.__name__} imports {name} from {found.group(1)} but no SURFACE row checks it; add one")


# Files that still reach vLLM directly, and the compat names they are to switch to (issue 22; being rewritten
# elsewhere). Every other library file goes through the compat modules or vLLM's public LLM / SamplingParams /
# LoRARequest.
PENDING_SWITCH = {
    # a benchmark of vLLM's own LoRA kernels beside ours (CUDA builds only; it reports "absent" when the import fails)
    "preft_rl/reports/kernels.py": "(a benchmark of vLLM's own LoRA kernels)",
}
PUBLIC = {("vllm", "SamplingParams"), ("vllm", "LLM"), ("vllm.lora.request", "LoRARequest")}


def test_the_library_reaches_vllm_only_through_the_compat_modules():
    compat = {"preft_rl/engine/vllm_compat.py", "preft_rl/engine/vllm_compat_serve.py"}
    offenders = []
    for path in sorted((REPO / "preft_rl").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in compat or rel in PENDING_SWITCH:
            continue
        for found in re.finditer(r"^\s*(?:from (vllm[\w.]*) import ([\w, ]+)|import (vllm[\w.]*))", path.read_text(), re.M):
            names = [n.strip() for n in (found.group(2) or "").split(",") if n.strip()]
            if found.group(3) or any((found.group(1), n) not in PUBLIC for n in names):
                offenders.append(f"{rel}: {found.group(0).strip()}")
    assert not offenders, ("these files reach vLLM beside the compat layer; move the access into "
                           f"preft_rl/engine/vllm_compat.py (or vllm_compat_serve.py) with a SURFACE row: {offenders}")


# ------------------------------------------------------------------------------ behaviour behind the names
def test_fused_linear_modules_are_vllms_packed_modules():
    """PreFT LoRA keys map HF modules into vLLM's fused ones (registry.py); vLLM's own map must be the same."""
    from preft_rl.engine.model import SUPPORTED_ARCHITECTURES

    expected = {fused.split(".")[-1]: [hf.split(".")[-1] for hf in hfs]
                for fused, hfs in vllm_compat.FUSED_LINEAR_MODULES.items() if len(hfs) > 1}
    for arch in SUPPORTED_ARCHITECTURES:
        cls = vllm_compat.model_registry_load(arch)
        assert {k: list(v) for k, v in cls.packed_modules_mapping.items()} == expected, (
            f"vLLM {vllm.__version__} changed {arch}.packed_modules_mapping (used by "
            "preft_rl.engine.vllm_compat.FUSED_LINEAR_MODULES); update that map")


def test_the_registry_uses_the_compat_module_map():
    """registry.py's fused-module map and row-parallel list are vLLM's names: they must be the compat layer's (until
    registry.py imports them from there)."""
    from preft_rl.engine import registry

    assert getattr(registry, "LORA_TARGETS", vllm_compat.FUSED_LINEAR_MODULES) == vllm_compat.FUSED_LINEAR_MODULES
    assert tuple(getattr(registry, "ROW_PARALLEL", vllm_compat.ROW_PARALLEL_MODULES)) == vllm_compat.ROW_PARALLEL_MODULES


def test_decoder_layers_hold_the_fused_modules_and_return_hidden_and_residual(engines):
    """The LoRA hooks sit on these modules (their sharding rule depends on the layer class), and the ReFT hook edits
    a decoder layer's (hidden, residual) output."""
    from vllm import SamplingParams

    engine = engines("lora")
    model = vllm_compat.runner_model(engine._runner)
    layers = vllm_compat.decoder_layers(model)
    assert len(layers) == engine.llm.llm_engine.model_config.hf_config.num_hidden_layers
    for module, class_name in vllm_compat.LINEAR_MODULE_CLASSES.items():
        found = type(layers[0].get_submodule(module)).__name__
        assert found == class_name, (f"vLLM {vllm.__version__} builds {module} as {found}, not {class_name} (used by "
                                     "preft_rl.engine.vllm_compat.FUSED_LINEAR_MODULES / ROW_PARALLEL_MODULES)")
    assert set(vllm_compat.ROW_PARALLEL_MODULES) == {m for m, c in vllm_compat.LINEAR_MODULE_CLASSES.items()
                                                    if c == "RowParallelLinear"}
    assert set(vllm_compat.LINEAR_MODULE_CLASSES) == set(vllm_compat.FUSED_LINEAR_MODULES)
    outputs = []
    handle = layers[0].register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    finally:
        handle.remove()
    assert outputs
    for output in outputs:
        assert isinstance(output, tuple) and len(output) == 2, (
            f"vLLM {vllm.__version__}'s decoder layer returns {type(output).__name__}, not (hidden, residual) (used by "
            "preft_rl.engine.vllm_compat.decoder_layers and the ReFT hook)")
        assert output[0].shape == output[1].shape


def _add_one(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x + 1)


def test_register_custom_op_makes_an_op_torch_can_call():
    lib = torch.library.Library("preft_rl_contract", "FRAGMENT")
    vllm_compat.register_custom_op("add_one", _add_one, mutates_args=["out"], fake_impl=lambda *a: None, lib=lib)
    x, out = torch.arange(4.0), torch.zeros(4)
    torch.ops.preft_rl_contract.add_one(x, out)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_model_registry_has_load_register():
    base = vllm_compat.model_registry_load("LlamaForCausalLM")
    assert base.__name__ == "LlamaForCausalLM"
    probe = type("PreftContractProbe", (base,), {})
    assert not vllm_compat.model_registry_has("PreftContractProbe")
    vllm_compat.model_registry_register("PreftContractProbe", probe)
    assert vllm_compat.model_registry_has("PreftContractProbe")
    assert vllm_compat.model_registry_load("PreftContractProbe") is probe
    with pytest.raises(ValueError, match="no model class registered as 'NoSuchArch'"):
        vllm_compat.model_registry_load("NoSuchArch")


def test_compilation_mode_and_tp_helpers(engines):
    from vllm.config.compilation import CompilationMode

    engine = engines("lora")  # an eager, in-process engine: this process is its only tensor-parallel rank
    config = engine.llm.llm_engine.vllm_config
    assert vllm_compat.compilation_is_eager(config)
    assert vllm_compat.vllm_config_hf_config(config) is vllm_compat.runner_hf_config(engine._runner)
    compiled = types.SimpleNamespace(compilation_config=types.SimpleNamespace(mode=CompilationMode.VLLM_COMPILE))
    assert not vllm_compat.compilation_is_eager(compiled)
    assert vllm_compat.tp_rank_and_size() == (0, 1)
    x = torch.arange(3.0)
    assert torch.equal(vllm_compat.tp_all_reduce(x.clone()), x)  # one rank: the sum is the tensor itself


def test_the_engine_reads_the_key_the_tag_writes():
    from preft_rl.engine import model

    assert model.EXTRA_ARGS_KEY == vllm_compat.EXTRA_ARGS_KEY  # until model.py imports it from vllm_compat
    runner = types.SimpleNamespace(requests={"r": types.SimpleNamespace(sampling_params=None)})
    assert vllm_compat.request_adapter(runner, "r") is None
    _, params = vllm_compat.tag_request({"prompt_token_ids": [1, 2]}, vllm.SamplingParams(), "a", 4)
    runner.requests["r"].sampling_params = params
    assert vllm_compat.request_adapter(runner, "r") == {"name": "a", "version": 4}


# ------------------------------------------------------------------------------ every check can fail
@pytest.mark.parametrize("item", STATIC, ids=lambda item: item.path)
def test_a_missing_vllm_module_fails_by_name(item, monkeypatch):
    module = item.path.partition(":")[0]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(AssertionError, match=re.escape(f"moved {item.path} (used by {item.used_by})") + ".*update that function"):
        check_item(item)


@pytest.mark.parametrize("item", [i for i in STATIC if i.path.partition(":")[2]], ids=lambda item: item.path)
def test_a_moved_vllm_name_fails_by_name(item, monkeypatch):
    module, _, qualname = item.path.partition(":")
    if "." in qualname:  # the class (or enum) holding the name is gone: the walk down from the real module fails
        monkeypatch.setattr(importlib.import_module(module), qualname.split(".")[0], _Gone())
    else:  # a module-level name: the module is there, the name is not
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    with pytest.raises(AssertionError, match=re.escape(f"moved {item.path} (used by {item.used_by})")):
        check_item(item)


def test_a_removed_method_a_changed_signature_and_a_dropped_field_fail(monkeypatch):
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.utils import torch_utils

    by_path = {item.path: item for item in SURFACE}
    checks = by_path["vllm.entrypoints.serve.engine.serving:BaseServing._check_model"]
    monkeypatch.delattr(BaseServing, "_check_model")
    with pytest.raises(AssertionError, match=r"BaseServing\._check_model \(used by preft_rl\.engine\.vllm_compat_serve"
                                             r"\.patch_serving_checks\): BaseServing has no '_check_model'"):
        check_item(checks)

    op = by_path["vllm.utils.torch_utils:direct_register_custom_op"]
    monkeypatch.setattr(torch_utils, "direct_register_custom_op", lambda op_name, op_func, mutates_args=None: None)
    with pytest.raises(AssertionError, match=r"register_custom_op\): takes no parameter\(s\) \['fake_impl', 'target_lib'\]"):
        check_item(op)

    table = by_path["vllm.entrypoints.openai.models.serving:OpenAIServingModels.lora_requests"]

    def init_without_table(self, engine_client, base_model_paths):
        self.base_model_paths = base_model_paths

    monkeypatch.setattr(OpenAIServingModels, "__init__", init_without_table)
    with pytest.raises(AssertionError, match=r"list_adapter / unlist_adapter\): .*no longer sets self\.lora_requests"):
        check_item(table)


def test_a_missing_runner_field_fails_by_name():
    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(num_reqs=0))  # no req_ids
    item = next(i for i in LIVE if i.path == "runner:input_batch.req_ids")
    with pytest.raises(AssertionError, match=r"moved runner:input_batch\.req_ids \(used by preft_rl\.engine\.vllm_compat"
                                             r"\.batch_layout\): no attribute or field 'req_ids'"):
        check_item(item, {"runner": runner})
