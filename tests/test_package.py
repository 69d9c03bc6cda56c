"""Packaging: the namespace mapping of kernels/ and rewards/, a cheap, vLLM-free import, and the docstring examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_top_level_folders_install_under_preft_rl():
    import preft_rl.kernels
    import preft_rl.rewards

    assert Path(preft_rl.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(preft_rl.rewards.__file__).resolve() == REPO / "rewards" / "__init__.py"


def test_import_is_cheap_and_does_not_shadow_hf_kernels():
    code = (
        "import sys, importlib.util; import preft_rl; "
        "assert 'vllm' not in sys.modules, 'import preft_rl imported vllm'; "
        "spec = importlib.util.find_spec('kernels'); "
        "assert spec is None or 'preft' not in (spec.origin or ''), spec.origin; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("module", ["preft_rl.adapters.config", "preft_rl.adapters.masks", "preft_rl.models",
                                    "preft_rl.trainers.rollout"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, result
