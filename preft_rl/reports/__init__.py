"""Benchmarks and report writers (`python -m preft_rl.reports.kernels` for the adapter kernels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def start_report(out: str | Path, stem: str, result: dict[str, Any], command: str, plot: bool = False) -> dict[str, Path]:
    """Create `out`, write `<stem>.json` (the result and the command that made it) and return the report's paths:
    json, markdown (`<stem>.md`) and, with plot, `<stem>.png` for the caller to write."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    if plot:
        paths["plot"] = out / f"{stem}.png"
    paths["json"].write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    return paths


def check_at_least(config: Any, minimum: int, names: tuple[str, ...]) -> None:
    """Raise ValueError naming the command-line flag of the first of `names` whose value in `config` is below `minimum`."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be >= {minimum}")
