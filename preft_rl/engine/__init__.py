"""PreftEngine: colocated vLLM serving many prefill-only adapters. The only package that imports vLLM."""

from .engine import PreftEngine

__all__ = ["PreftEngine"]
