"""Per-step metrics: always to metrics.jsonl, and to W&B when logger=wandb (offline by default)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from peftlab.config import LoggerConfig

log = logging.getLogger(__name__)


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs when ``logger.group`` is unset: the sweep directory's
    last two path parts, ``2026-11-23_20-39-38`` for the default ``multirun/<date>/<time>``."""
    return "_".join(Path(sweep_dir).parts[-2:])


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str):
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a", encoding="utf-8")
        self.wandb_run = None
        if cfg.name == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                mode=cfg.mode, dir=str(run_dir), name=name, config=config, reinit="finish_previous",
            )

    def log(self, step: int, values: dict) -> None:
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def rewind(self, step: int) -> None:
        """Drop metrics.jsonl rows of steps >= ``step`` (and a row cut short by a kill), so a run
        resumed at ``step`` (or restarted at 0) writes the rows an uninterrupted run would.
        W&B rows already sent stay where they are."""
        keep = 0
        with self.path.open("rb") as handle:
            for line in handle:
                try:
                    if not line.endswith(b"\n") or json.loads(line)["step"] >= step:
                        break
                except (ValueError, KeyError):
                    break
                keep += len(line)
        self.handle.truncate(keep)  # the file is opened for appending: later rows follow the cut

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        self.handle.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullTracker:
    """Takes the same calls as Tracker and records nothing (torchrun ranks other than 0)."""

    def log(self, step: int, values: dict) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass
