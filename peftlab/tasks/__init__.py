"""Tasks: data + formatting + metric. ``build_task`` picks the class by ``task.type``."""
from __future__ import annotations

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.tasks.base import Task
from peftlab.tasks.classification import ClassificationTask
from peftlab.tasks.data import load_splits
from peftlab.tasks.lm import LMTask

TASK_TYPES = {"classification": ClassificationTask, "lm": LMTask}


def build_task(cfg: TaskConfig, tokenizer, arch, splits=None, facts=None) -> Task:
    if cfg.type not in TASK_TYPES:
        raise ConfigError("task.type", f"got {cfg.type!r}; allowed: {', '.join(TASK_TYPES)}")
    if splits is None:
        splits, facts = load_splits(cfg)
    return TASK_TYPES[cfg.type](cfg, tokenizer, arch, splits, facts)


__all__ = ["Task", "build_task", "load_splits", "TASK_TYPES"]
