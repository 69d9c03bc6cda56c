"""PreftConfig: the one typed description of a prefill-only adapter, validated once."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .methods.base import METHOD_FIELDS

SCOPES = ("prompt", "all")
_POSITIONS_RE = re.compile(r"^f(\d+)\+l(\d+)$")


@dataclass
class PreftConfig:
    """A prefill-only adapter: applied at prompt tokens, switched off for generated tokens.

    >>> PreftConfig(method="lora", r=16, alpha=32).scaling
    2.0
    >>> PreftConfig(method="loreft", r=4, layers=[3, 9], positions="f7+l7").first_last
    (7, 7)
    """

    method: str = field(
        default="lora",
        metadata={"help": "A registered adapter method: 'lora', 'loreft', 'direft' (preft_rl.adapters.methods.method_names())."},
    )
    r: int = field(default=8, metadata={"help": "Rank of the LoRA update or of the ReFT subspace."})
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling numerator: scaling = alpha / r. Default 2 * r."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (LoRA) or its low-rank activations (ReFT)."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "LoRA only. 'all-linear' (every nn.Linear inside the decoder layers, not lm_head) "
            "or a list of module names such as ['q_proj', 'v_proj'], matched as PEFT matches a list: a module "
            "whose full path (e.g. 'model.layers.0.self_attn.q_proj') equals a name or ends in '.' + name."
        },
    )
    layers: str | list[int] = field(
        default="all", metadata={"help": "ReFT only. 'all' or a list of decoder-layer indices to intervene after."}
    )
    positions: str = field(
        default="all",
        metadata={
            "help": "ReFT only. 'all' (every prompt token) or 'fN+lM' (first N and last M prompt tokens, "
            "counted from the first non-pad prompt token)."
        },
    )
    share_first_last: bool = field(
        default=True,
        metadata={
            "help": "ReFT with 'fN+lM': one intervention for first and last positions (default) or two. "
            "With two, a token in both ranges gets the 'first' one, then the 'last' one."
        },
    )
    adapter_scope: str = field(
        default="prompt",
        metadata={
            "help": "'prompt' (PreFT: the adapter acts at prompt tokens only; decode runs the base model) or "
            "'all' (the all-token baseline: every token, as an ordinary PEFT LoRA or pyreft intervention)."
        },
    )
    init_scale: float | None = field(
        default=None,
        metadata={
            "help": "LoRA and DiReFT. Bound s of the uniform(-s, s) random half of the initialisation (LoRA A, DiReFT W1); "
            "default 1/sqrt(d_in), PEFT's Kaiming-uniform bound. The other half is zero (LoRA B, "
            "DiReFT W2) or equal to R (LoReFT W, with R random orthogonal), so every method starts "
            "as an exact no-op that still receives gradients."
        },
    )
    seed: int | None = field(default=None, metadata={"help": "Seed for the adapter initialisation."})

    def __post_init__(self) -> None:
        from .methods import get_method

        try:
            spec = get_method(self.method)
        except ValueError as exc:
            raise ValueError(f"PreftConfig: {exc}") from None
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"PreftConfig: r={self.r!r} must be a positive integer, e.g. r=8")
        # Fields another method reads are refused, not silently ignored (e.g. layers=[0] on a LoRA).
        ignored = [f"{name}={getattr(self, name)!r}" for name in METHOD_FIELDS
                   if name not in spec.fields and getattr(self, name) != _DEFAULTS[name]]
        if ignored:
            raise ValueError(
                f"PreftConfig: {', '.join(ignored)} do not apply to method={self.method!r}, which reads "
                f"{sorted(spec.fields)}; remove them (or pick the method they belong to)"
            )
        if self.alpha is not None:
            _check_number("alpha", self.alpha)
            if not (self.alpha > 0 and math.isfinite(self.alpha)):
                raise ValueError(f"PreftConfig: alpha={self.alpha!r} must be > 0 and finite (LoRA scaling is alpha / r), e.g. alpha={2 * self.r}")
        _check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PreftConfig: dropout={self.dropout!r} must be in [0, 1)")
        if self.init_scale is not None:
            _check_number("init_scale", self.init_scale)
            if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
                raise ValueError(f"PreftConfig: init_scale={self.init_scale!r} must be > 0 and finite, or None for the default")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"PreftConfig: seed={self.seed!r} must be an integer or None")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ValueError(
                    f"PreftConfig: target_modules={self.target_modules!r} must be 'all-linear' or a "
                    "non-empty list of module names, e.g. ['q_proj', 'v_proj']"
                )
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"PreftConfig: layers={self.layers!r} must be 'all' or a list of layer indices")
        else:
            layers = list(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"PreftConfig: layers={self.layers!r} must be 'all' or a non-empty list of ints")
            if len(set(layers)) != len(layers):
                raise ValueError(f"PreftConfig: layers={self.layers!r} has duplicates")
            self.layers = sorted(layers)
        if self.positions != "all" and not _POSITIONS_RE.match(self.positions):
            raise ValueError(
                f"PreftConfig: positions={self.positions!r} must be 'all' or 'fN+lM' such as 'f7+l7'"
            )
        if self.adapter_scope not in SCOPES:
            raise ValueError(f"PreftConfig: adapter_scope={self.adapter_scope!r}: use 'prompt' (PreFT) or 'all' (all-token baseline)")
        if self.adapter_scope == "all" and self.positions != "all":
            raise ValueError(
                f"PreftConfig: adapter_scope='all' acts at every token, so positions={self.positions!r} has no meaning; "
                "use positions='all' (or adapter_scope='prompt' for first/last prompt positions)"
            )
        spec.validate(self)

    @classmethod
    def for_method(cls, method: str, **options: Any) -> PreftConfig:
        """A config from options meant for several methods, keeping those `method` reads (a command line with
        --positions for ReFT and --target-modules for LoRA passes both).

        >>> PreftConfig.for_method("lora", r=8, positions="f5+l5").positions
        'all'
        >>> PreftConfig.for_method("loreft", r=8, positions="f5+l5").positions
        'f5+l5'
        """
        from .methods import get_method

        reads = get_method(method).fields
        return cls(method=method, **{k: v for k, v in options.items() if k not in METHOD_FIELDS or k in reads})

    @property
    def method_spec(self):
        """The registered AdapterMethod of this config (preft_rl.adapters.methods)."""
        from .methods import get_method

        return get_method(self.method)

    @property
    def prefill_only(self) -> bool:
        """True for a PreFT adapter (prompt tokens only); False for the all-token baseline."""
        return self.adapter_scope == "prompt"

    @property
    def scaling(self) -> float:
        """alpha / r (LoRA)."""
        if self.alpha is None:
            raise ValueError(f"PreftConfig: method={self.method!r} has no alpha, so no LoRA scaling")
        return float(self.alpha) / self.r

    @property
    def first_last(self) -> tuple[int, int] | None:
        """(N, M) for positions 'fN+lM'; None for 'all'."""
        match = _POSITIONS_RE.match(self.positions)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def intervention_groups(self) -> tuple[str, ...]:
        """Names of the ReFT interventions per layer: one shared, or 'first' and 'last'."""
        if self.first_last is not None and not self.share_first_last:
            return ("first", "last")
        return ("shared",)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PreftConfig)}


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"PreftConfig: {name}={value!r} must be a number, got {type(value).__name__}")
