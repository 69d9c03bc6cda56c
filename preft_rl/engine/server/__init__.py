"""`preft-rl serve`: vLLM's OpenAI-compatible server with many prefill-only adapters (see launch.py and plugins.py)."""
