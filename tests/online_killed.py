"""`preft-rl online ARGS...` that SIGKILLs its own process group (itself and vLLM's engine processes) at a set point:

    KILL_AT=step:3        just after step 3 is logged (mid-round: the round's first optimizer step is applied)
    KILL_AT=rename:4      inside checkpoint-4's save, with checkpoint-4.tmp written but not yet renamed
    KILL_AT=saved:4       just after checkpoint-4 is saved, before the adapters are saved and pushed

Run with start_new_session=True so that the kill takes this run's processes only (test_online.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from preft_rl.cli import main
from preft_rl.trainers import checkpoint, core


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    if point == "step":
        log = core.PreftRLTrainer._log

        def logged(self, metrics):
            log(self, metrics)
            if metrics.get("step") == step:
                die()

        core.PreftRLTrainer._log = logged
    elif point == "rename":
        rename = Path.rename

        def renamed(self, target):
            if Path(target).name == f"checkpoint-{step}":
                die()
            return rename(self, target)

        Path.rename = renamed
    elif point == "saved":
        save = checkpoint.save

        def saved(trainer, at, rollout):
            path = save(trainer, at, rollout)
            if at == step:
                die()
            return path

        checkpoint.save = saved
    else:
        raise SystemExit(f"KILL_AT={point}:{step}: the point must be step, rename or saved")


if __name__ == "__main__":
    point, at = os.environ["KILL_AT"].split(":")
    arm(point, int(at))
    sys.exit(main(sys.argv[1:]))
