"""A task is data + formatting + a metric. The trainer sees only this interface."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from peftlab.config import TaskConfig


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (input_ids, attention_mask), both (B, T_max)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class Task:
    """Subclasses fill ``self.encoded[split]`` (a list of examples) and implement
    ``collate``, ``loss`` and ``evaluate_batches``."""

    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: TaskConfig, tokenizer, arch, splits: dict[str, list[dict]], facts: dict):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.arch = arch
        self.splits = splits
        self.facts = facts
        self.encoded: dict[str, list] = {}

    # -- what subclasses write ---------------------------------------------- #
    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate_batches(self, model: nn.Module, batches: Iterator[dict]) -> dict[str, float]:
        raise NotImplementedError

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms ``loss`` averages over: here one per example. A task whose loss is a
        mean over something else (tokens) says so, so that shards of a batch can be weighted."""
        return int(batch["input_ids"].shape[0])

    # -- shared ---------------------------------------------------------------- #
    def num_train_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.encoded["train"]) / batch_size)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[dict]:
        """One epoch in a seeded random order."""
        data = self.encoded["train"]
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield self.collate([data[i] for i in order[start:start + batch_size]])

    def eval_batches(self, split: str, batch_size: int) -> Iterator[dict]:
        data = self.encoded[split]
        if self.cfg.max_eval_examples:
            data = data[: self.cfg.max_eval_examples]
        for start in range(0, len(data), batch_size):
            yield self.collate(data[start:start + batch_size])

    def num_eval_examples(self, split: str) -> int:
        n = len(self.encoded[split])
        return min(n, self.cfg.max_eval_examples) if self.cfg.max_eval_examples else n

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        batches = (to_device(b, device) for b in self.eval_batches(split, batch_size))
        with autocast():
            metrics = self.evaluate_batches(model, batches)
        model.train(was_training)
        metrics["n"] = self.num_eval_examples(split)
        return metrics


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())
