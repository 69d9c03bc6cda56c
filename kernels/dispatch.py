"""Backend selection: the Triton kernels or the pure-torch references.

Order of precedence: the `backend=` argument of an op, then the `PREFT_KERNEL_BACKEND` environment variable
(`torch`, `triton` or `auto`), then the default: Triton when every tensor is on CUDA, torch otherwise.

Triton is imported only when a Triton op actually runs (the kernels live in the `triton_*` modules), so
`import preft_rl.kernels` stays cheap and never touches a GPU driver. Forcing Triton on CPU tensors needs the
Triton interpreter, switched on with `TRITON_INTERPRET=1` in the environment *before* triton is imported
(Triton decides at `@triton.jit` time whether a kernel is compiled or interpreted).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton")
ENV_VAR = "PREFT_KERNEL_BACKEND"


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (the value Triton reads at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """The backend ('torch' or 'triton') that runs an op on `tensors`."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; use one of {BACKENDS} (or 'auto' in ${ENV_VAR})")
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed; use backend='torch'")
        devices = {t.device.type for t in tensors}
        if devices != {"cuda"} and not triton_interpreting():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {sorted(devices)}); to run the kernels on CPU set "
                "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
            )
    return choice
