"""Console hygiene for long runs: keep vLLM, transformers and math-verify quiet unless asked.

vLLM prints a few dozen INFO/WARNING lines per engine start and math-verify warns on every call with its
timeouts off; in a training run they bury the progress bar. `quiet_libraries()` must run before vLLM
is imported (vLLM reads VLLM_LOGGING_LEVEL once, at import).
"""

from __future__ import annotations

import logging
import os
import warnings

_NOISY_LOGGERS = ("vllm", "math_verify", "transformers", "accelerate", "datasets", "deepspeed", "torch.distributed", "httpx")


def quiet_libraries(verbose: bool = False) -> None:
    """Errors only from the libraries a run drives (verbose=True leaves everything as it was)."""
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(vllm|transformers|torch|accelerate)\..*")
