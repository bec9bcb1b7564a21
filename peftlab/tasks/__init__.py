"""Tasks: data + formatting + metric. ``build_task`` picks the class by ``task.type``."""
from __future__ import annotations

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.tasks.base import Task
from peftlab.tasks.classification import ClassificationTask
from peftlab.tasks.data import load_splits
from peftlab.tasks.generation import GenerationTask
from peftlab.tasks.lm import LMTask
from peftlab.tasks.multiple_choice import MultipleChoiceTask
from peftlab.tasks.regression import RegressionTask

TASK_TYPES = {"classification": ClassificationTask, "regression": RegressionTask,
              "multiple_choice": MultipleChoiceTask, "lm": LMTask, "generation": GenerationTask}


def head_outputs(cfg: TaskConfig, splits: dict[str, list[dict]]) -> int:
    """Outputs of an encoder's fresh head: one per class, or one score per (context, option) pair."""
    if cfg.type in ("multiple_choice", "regression"):  # one score per option / per example
        return 1
    if cfg.labels:  # the declared classes, whether or not each occurs in the data
        return len(cfg.labels)
    return 1 + max(r.get("label", 0) for records in splits.values() for r in records)


def build_task(cfg: TaskConfig, tokenizer, arch, splits=None, facts=None) -> Task:
    if cfg.type not in TASK_TYPES:
        raise ConfigError("task.type", f"got {cfg.type!r}; allowed: {', '.join(TASK_TYPES)}")
    limit = getattr(arch, "max_positions", None)
    if limit and cfg.max_length > limit:
        raise ConfigError("task.max_length", f"{cfg.max_length} > {limit}, the positions this model's learned "
                          f"position table holds; allowed: task.max_length <= {limit}")
    if splits is None:
        splits, facts = load_splits(cfg)
    return TASK_TYPES[cfg.type](cfg, tokenizer, arch, splits, facts)


__all__ = ["Task", "build_task", "head_outputs", "load_splits", "TASK_TYPES"]
