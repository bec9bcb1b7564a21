"""Hydra callbacks (registered under ``hydra.callbacks`` in conf/config.yaml).

:class:`SweepSummary` runs once a multirun has finished: it writes the sweep's
table (``peftlab table <sweep dir>``) as ``table.md`` and ``table.csv`` into the
sweep directory and, when the sweep logs to W&B, logs the table to one more W&B
run (``job_type=sweep-summary``) in the sweep's group, beside its jobs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from peftlab.errors import ConfigError
from peftlab.training.tracking import sweep_group

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """After a sweep: ``table.md`` + ``table.csv`` in its directory, and the table on W&B."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from peftlab.reporting.table import build_table

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = build_table([sweep_dir])
        except ConfigError as err:  # e.g. no job wrote a result.json: nothing to summarize
            log.warning("no sweep summary: %s", err)
            return
        (sweep_dir / "table.md").write_text(table.render("md") + "\n", encoding="utf-8")
        (sweep_dir / "table.csv").write_text(table.render("csv"), encoding="utf-8")
        log.info("sweep summary: %s", sweep_dir / "table.md")
        logger = config.get("logger") or {}
        if logger.get("name") == "wandb" and logger.get("mode") in ("offline", "online"):
            group = logger.get("group") or sweep_group(sweep_dir)
            log_table(table, logger, group, sweep_dir)


def log_table(table, logger: DictConfig, group: str, sweep_dir: Path) -> None:
    """One W&B run in ``group`` holding the table (raw numbers, as table.csv)."""
    import wandb

    columns, rows = table.records()
    run = wandb.init(project=logger.project, entity=logger.entity, group=group, job_type="sweep-summary",
                     name=f"{group}-summary", tags=list(logger.tags), mode=logger.mode, dir=str(sweep_dir),
                     reinit="finish_previous")
    try:
        run.log({"sweep_table": wandb.Table(columns=columns, data=rows, allow_mixed_types=True)})
    finally:
        run.finish()
