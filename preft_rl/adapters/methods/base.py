"""AdapterMethod: everything about one adapter method in one object, and the registry of methods.

A method (LoRA, LoReFT, DiReFT, or one a user registers) answers every method-specific question the library asks:

    config        which PreftConfig fields it reads (`fields`), extra validation and defaults (`validate`)
    HF model      which modules it builds and how they attach to the base (`build`), which parameter names are its
                  own (`param_markers`); the modules' maths is the kernels' one torch copy (preft_rl.kernels);
                  many tenants' modules at one site as one module (`build_tenant_site`, TenantPreftModel)
    files         derived tensors saved next to the parameters and checked on load (`derived_tensors`)
    engine        the stacked slot tensors (`engine_tensor_shapes`, `engine_slot_dim`), staging file tensors into
                  them (`engine_stage`, `engine_expected_keys`, `engine_write`, TP sharding inside those), and
                  applying them in a step (`engine_apply_linear` after vLLM's fused linear modules, or
                  `engine_apply_residual` after a decoder layer, chosen by `site`)
    plan          parameter and engine-slot counts for `preft-rl plan` (`plan_adapter_params`, `plan_slot_elems`)

Nothing outside a method compares method names: it asks `get_method(config.method)`. A new method is a subclass
registered with `register_method`, which a test can do without touching the library (tests/test_method_registry.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import PreftConfig

# PreftConfig fields that only some methods read; every other field (method, r, adapter_scope, seed) is common.
METHOD_FIELDS = ("alpha", "dropout", "target_modules", "layers", "positions", "share_first_last", "init_scale")
SITES = ("linear", "residual")


@dataclass
class BuiltModule:
    """An adapter module built detached from the base model: its name under the decoder layers ('3.mlp.down_proj',
    '3.preft_reft'), the module, and `attach()`, which changes the base model and returns `detach(check_only=False)`."""

    name: str
    module: nn.Module
    attach: Callable[[], Callable[..., None]]
    # attaches another module at this module's site instead (a TenantPreftModel's site module); None: not supported
    place: Callable[[nn.Module], Callable[..., None]] | None = None


class AdapterMethod:
    """Base class of an adapter method; subclass it, set the class attributes and implement the hooks."""

    name: ClassVar[str]
    fields: ClassVar[frozenset[str]] = frozenset()  # the METHOD_FIELDS this method reads
    site: ClassVar[str] = "residual"  # 'linear': wraps linear layers; 'residual': edits a decoder layer's output
    param_markers: ClassVar[tuple[str, ...]] = ()  # substrings of this method's parameter names in the base model
    engine_slot_dim: ClassVar[int] = 0  # the slot axis of every engine tensor

    # ---------------------------------------------------------------------------------- config
    def validate(self, config: PreftConfig) -> None:
        """Method-specific checks and defaults, run once by PreftConfig.__post_init__ (may set fields it owns)."""

    # -------------------------------------------------------------------------------- HF model
    def build(self, base_model: nn.Module, layers: nn.ModuleList, layers_name: str, config: PreftConfig, slot: Any,
              generator: torch.Generator | None) -> list[BuiltModule]:
        """The adapter modules for `base_model`, built without changing it; each reads `slot.current` (a
        TokenSelection, or None when the adapter is off) when it runs."""
        raise NotImplementedError

    def build_tenant_site(self, tenants: dict[str, nn.Module], slot: Any) -> nn.Module:
        """One module applying many tenants' modules of one site (built by `build`, in tenant order) in one forward:
        each row's tokens get its own tenant's edit. It reads `slot.current`, a TenantSelection (or None: off), and the
        tenants' parameters stay their modules' own (registered again under the site module)."""
        raise NotImplementedError(
            f"adapter method {self.name!r} cannot train many tenants in one run: implement "
            f"{type(self).__name__}.build_tenant_site (see LoraMethod and the ReFT methods)")

    def derived_tensors(self) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """{suffix of a derived file tensor: (suffix of the parameter it is computed from, function)}. Written next to
        the parameters on save (what an engine uses), recomputed and compared on load (LoReFT's materialised R)."""
        return {}

    # ---------------------------------------------------------------------------------- engine
    def engine_tensor_shapes(self, shape: Any, max_rank: int, capacity: int, extended: bool) -> dict[str, tuple[int, ...]]:
        """Shapes of the engine's stacked tensors for `capacity` slots (`shape`: the engine's ModelShape)."""
        raise NotImplementedError

    def engine_extended(self, config: PreftConfig) -> bool:
        """Whether an adapter with this config needs the registry's extended tensor set (allocated on demand)."""
        return False

    def engine_check_config(self, name: str, config: PreftConfig, dtype: torch.dtype) -> None:
        """Refuse a config the engine cannot hold in `dtype` (before any tensor is looked at)."""

    def engine_expected_keys(self, config: PreftConfig, shape: Any) -> frozenset[str] | None:
        """The file keys an adapter with `config` has on this model; None where the config alone cannot say."""
        raise NotImplementedError

    def engine_stage(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig, shape: Any,
                     check: Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor]) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """Validated tensors (this rank's shard) by internal key, and the file keys they came from. `check(key, tensor,
        shape)` is the registry's validation (type, shape, finite in the engine's dtype). Changes nothing."""
        raise NotImplementedError

    def engine_write(self, tensors: dict[str, torch.Tensor], slot: int, staged: dict[str, torch.Tensor],
                     config: PreftConfig, shape: Any, max_rank: int) -> np.ndarray:
        """Copy staged tensors into `slot` (already zeroed); returns the bool mask [num_layers] of layers it acts at."""
        raise NotImplementedError

    def engine_linear_modules(self, shape: Any) -> tuple[str, ...]:
        """site='linear': the vLLM modules inside each decoder layer whose output the engine edits."""
        return ()

    def engine_apply_linear(self, x: torch.Tensor, out: torch.Tensor, tensors: dict[str, torch.Tensor], layer: int,
                            module: str, metadata: Any, shape: Any, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """site='linear': add the adapters' edit to `out` (T, d_out) in place at the metadata's tokens."""
        raise NotImplementedError

    def engine_apply_residual(self, residual: torch.Tensor, tensors: dict[str, torch.Tensor], layer: int,
                              passes: list[tuple[str, Any]]) -> None:
        """site='residual': edit the residual stream (T, hidden) in place; `passes` is [(tensor-name prefix, metadata)]
        in order ('' for the main set, 'last.' for the extended set)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ plan
    def plan_adapter_params(self, shape: Any, rank: int) -> int:
        """Trainable parameters of one adapter on every layer (`shape`: preft_rl.plan.ModelShape)."""
        raise NotImplementedError

    def plan_slot_elems(self, shape: Any, rank: int, tp: int) -> float:
        """Elements one engine slot takes on one tensor-parallel rank."""
        raise NotImplementedError


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod, *, replace: bool = False) -> AdapterMethod:
    """Make `method` available as PreftConfig(method=method.name); returns it (usable as a class decorator's result)."""
    if isinstance(method, type):
        method = method()
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an adapter method needs a `name` that is an identifier, got {name!r}")
    if method.site not in SITES:
        raise ValueError(f"adapter method {name!r}: site={method.site!r} must be one of {SITES}")
    unknown = set(method.fields) - set(METHOD_FIELDS)
    if unknown:
        raise ValueError(f"adapter method {name!r}: fields {sorted(unknown)} are not PreftConfig fields; use some of {METHOD_FIELDS}")
    if not method.param_markers:
        raise ValueError(f"adapter method {name!r} needs param_markers (substrings that name its parameters)")
    if name in _METHODS and not replace:
        raise ValueError(f"adapter method {name!r} is already registered; pass replace=True to replace it")
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def get_method(name: str) -> AdapterMethod:
    """The registered method called `name`, or a ValueError listing the registered ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {method_names()} (or register a new adapter method with register_method())")
    return _METHODS[name]


def method_names() -> list[str]:
    """Registered method names, built-ins first ('lora', 'loreft', 'direft', then any registered later)."""
    return list(_METHODS)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name inside a base model belongs to an adapter (of any registered method)."""
    return any(marker in name for method in _METHODS.values() for marker in method.param_markers)


def attach_after_layer(layer: nn.Module, attribute: str, module: nn.Module) -> Callable[..., None]:
    """Put `module` on a decoder layer as `attribute` and call `module(hidden)` on the layer's output (the residual
    stream); returns the function that undoes both. The module is called (not a method of it), so its own forward
    hooks run: DeepSpeed ZeRO-3 gathers an adapter module's parameters in them."""
    if hasattr(layer, attribute):
        raise ValueError(f"the decoder layer already has {attribute!r}: two adapters of one kind cannot share a layer")
    setattr(layer, attribute, module)

    def edit_output(_layer: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (module(output[0]), *output[1:])
        return module(output)

    handle = layer.register_forward_hook(edit_output)

    def detach(check_only: bool = False) -> None:
        if not check_only:
            handle.remove()
            delattr(layer, attribute)

    return detach
