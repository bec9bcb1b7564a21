"""Causal language modelling on a text corpus: next-token loss and perplexity.

Each text is tokenized and cut into pieces of at most ``task.max_length``
tokens (the corpus split happens on whole texts first, so pieces of one text
never land in two splits). Loss is the mean next-token cross-entropy over
real (non-pad) tokens; perplexity = exp(loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peftlab.errors import ConfigError
from peftlab.tasks.base import Task, pad


def token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over real tokens, count of predicted tokens)."""
    targets = input_ids[:, 1:]
    keep = mask[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return losses[keep].sum(), int(keep.sum())


class LMTask(Task):
    metric_name = "perplexity"
    higher_is_better = False

    def __init__(self, cfg, tokenizer, arch, splits, facts):
        super().__init__(cfg, tokenizer, arch, splits, facts)
        if arch.kind != "causal":
            raise ConfigError("task", f"task {cfg.name!r} (lm) needs a causal LM; model {arch.name!r} is an encoder")
        if cfg.metric not in ("perplexity", "loss"):
            raise ConfigError("task.metric", f"got {cfg.metric!r}; allowed for lm: perplexity, loss")
        self.encoded = {name: self.pieces(records) for name, records in splits.items()}

    def pieces(self, records: list[dict]) -> list[list[int]]:
        out = []
        for r in records:
            ids = self.tokenizer(r["text"])["input_ids"]
            for start in range(0, len(ids), self.cfg.max_length):
                piece = ids[start:start + self.cfg.max_length]
                if len(piece) >= 2:
                    out.append(piece)
        return out

    def collate(self, examples):
        ids, mask = pad(examples, self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, n = token_loss_sum(logits, batch["input_ids"], batch["attention_mask"])
        return total / max(n, 1)

    def loss_units(self, batch):
        """The loss is a mean over predicted tokens: every real token but each row's first."""
        return int(batch["attention_mask"][:, 1:].sum())

    def evaluate_batches(self, model, batches):
        total, n = 0.0, 0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, k = token_loss_sum(logits, batch["input_ids"], batch["attention_mask"])
            total, n = total + s.item(), n + k
        loss = total / max(n, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}
