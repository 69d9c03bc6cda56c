"""PreftEngine: colocated vLLM serving many prefill-only adapters. The only package that imports vLLM.

`SamplingParams` is vLLM's, re-exported so callers need not import vLLM themselves.
"""

from vllm import SamplingParams

from .engine import PreftEngine
from .model import FailedRequestsError

__all__ = ["FailedRequestsError", "PreftEngine", "SamplingParams"]
