"""Benchmarks and report writers (`python -m preft_rl.reports.kernels` for the adapter kernels)."""
