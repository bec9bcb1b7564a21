"""Regression: a real-valued label (STS-B-style similarity), on an encoder with a one-output head.

    score = head(encoder(text or [CLS] a [SEP] b [SEP]))        loss = MSE(score, label)
    metrics: Pearson and Spearman correlation of scores and labels over the split (the headline
    is ``task.metric``), and the mean squared error

A causal LM would need its score verbalized; that is not offered (the model stops with one line).
Per-example predictions are not written: a score is not right or wrong, so there is nothing for
``peftlab paired``'s exact test to count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.tasks.base import Task, pad
from peftlab.tasks.classification import encode_for_encoder

METRICS = ("pearson", "spearman")


class RegressionTask(Task):
    def __init__(self, cfg, tokenizer, arch, splits, facts):
        super().__init__(cfg, tokenizer, arch, splits, facts)
        if arch.kind != "encoder":
            raise ConfigError("task.type", f"regression needs an encoder with a one-output head; model "
                              f"{getattr(arch, 'name', '?')!r} is a causal LM; allowed: an encoder (e.g. minilm)")
        if cfg.metric not in METRICS:
            raise ConfigError("task.metric", f"got {cfg.metric!r}; allowed for regression: {', '.join(METRICS)}")
        self.metric_name = cfg.metric
        self.encoded = {name: [(*encode_for_encoder(tokenizer, r, cfg.max_length), float(r["label"]))
                               for r in records] for name, records in splits.items()}

    def collate(self, examples):
        ids, mask = pad([e[0] for e in examples], self.tokenizer.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([e[2] for e in examples], dtype=torch.float)}
        if examples[0][1] is not None:
            batch["token_type_ids"] = pad([e[1] for e in examples], 0)[0]
        return batch

    def scores(self, model: nn.Module, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return model(**inputs).logits[:, 0].float()

    def loss(self, model, batch):
        return F.mse_loss(self.scores(model, batch), batch["labels"])

    def evaluate_batches(self, model, batches):
        from scipy.stats import pearsonr, spearmanr

        scores, labels = [], []
        for batch in batches:
            scores += self.scores(model, batch).tolist()
            labels += batch["labels"].tolist()
        constant = len(set(scores)) < 2 or len(set(labels)) < 2  # a correlation is undefined: report 0
        return {
            "pearson": 0.0 if constant else float(pearsonr(scores, labels)[0]),
            "spearman": 0.0 if constant else float(spearmanr(scores, labels)[0]),
            "mse": sum((s - y) ** 2 for s, y in zip(scores, labels)) / max(len(labels), 1),
            "loss": sum((s - y) ** 2 for s, y in zip(scores, labels)) / max(len(labels), 1),
        }
