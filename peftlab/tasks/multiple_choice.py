"""Multiple choice: a context and K options, one of them right (PIQA, OpenBookQA, CommonsenseQA, SIQA).

Causal LM, scored as lm-evaluation-harness scores it::

    context = task.prompt with {text} (and {passage}) filled in        e.g. "Question: {text}\\nAnswer:"
    score_k = log p(" " + option_k | context) = Σ_t log p(token_t | context, option_k[<t])
    acc      = mean[argmax_k score_k            == answer]
    acc_norm = mean[argmax_k score_k / len(option_k) == answer]      (length in characters, as the harness)

Encoder: each (context, option) pair goes through the sequence classifier with one output
(``[CLS] context [SEP] option [SEP]``, the context truncated first), and the K outputs are the
scores (what transformers' ``*ForMultipleChoice`` heads compute). Training, for both, is
cross-entropy of the answer under a softmax over the example's K scores (the raw log-likelihood
sums for a causal LM), so it optimises what ``acc`` measures. K may differ between examples:
pairs are scored flat and grouped back per example.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.tasks.base import Task, pad

METRICS = ("acc", "acc_norm")


class MultipleChoiceTask(Task):
    metric_name = "acc"

    def __init__(self, cfg, tokenizer, arch, splits, facts):
        super().__init__(cfg, tokenizer, arch, splits, facts)
        self.causal = arch.kind == "causal"
        allowed = METRICS if self.causal else ("acc",)
        if cfg.metric not in allowed:
            raise ConfigError("task.metric", f"got {cfg.metric!r}; allowed for multiple_choice on this model: "
                              f"{', '.join(allowed)}")
        self.metric_name = cfg.metric
        check_records(splits)
        self.encoded = {name: [self.encode(r) for r in records] for name, records in splits.items()}

    def context(self, record: dict) -> str:
        return self.cfg.prompt.format(text=record["text"], passage=record.get("passage", ""))

    def encode(self, record: dict) -> tuple[list, int, list[int]]:
        """(per option: token ids, first option position or pair type ids; the label; option lengths)."""
        context, limit = self.context(record), self.cfg.max_length
        options = []
        if self.causal:
            context_ids = self.tokenizer(context)["input_ids"]
            for option in record["options"]:
                option_ids = self.tokenizer(" " + option, add_special_tokens=False)["input_ids"][:limit - 1]
                kept = context_ids[-(limit - len(option_ids)):]  # cut the context from the left
                options.append((kept + option_ids, len(kept)))
        else:
            for option in record["options"]:
                enc = self.tokenizer(context, option, truncation="only_first", max_length=limit)
                options.append((enc["input_ids"], enc.get("token_type_ids")))
        return options, record["label"], [len(o) for o in record["options"]]

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        pairs = [pair for options, _, _ in examples for pair in options]
        ids, mask = pad([p[0] for p in pairs], self.tokenizer.pad_token_id)
        batch = {
            "input_ids": ids, "attention_mask": mask,
            "group": torch.tensor([i for i, (options, _, _) in enumerate(examples) for _ in options]),
            "labels": torch.tensor([label for _, label, _ in examples]),
            "option_chars": torch.tensor([n for _, _, lengths in examples for n in lengths], dtype=torch.float),
        }
        if self.causal:
            batch["option_start"] = torch.tensor([p[1] for p in pairs])
        elif pairs[0][1] is not None:
            batch["token_type_ids"] = pad([p[1] for p in pairs], 0)[0]
        return batch

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])  # examples, not (context, option) pairs

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One score per (context, option) pair: its log-likelihood (causal) or the head's output."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits
        if not self.causal:
            return logits[:, 0].float()
        ids, mask, start = batch["input_ids"], batch["attention_mask"], batch["option_start"]
        position = torch.arange(ids.shape[1], device=ids.device)
        scored = (position[None, 1:] >= start[:, None]) & mask[:, 1:].bool()  # (P, T-1): option tokens
        pair, step = scored.nonzero(as_tuple=True)
        token_logits = logits[pair, step].float()  # (N, V): only the positions that predict an option token
        token_scores = token_logits.log_softmax(-1).gather(1, ids[pair, step + 1][:, None])[:, 0]
        return torch.zeros(ids.shape[0], device=ids.device).index_add_(0, pair, token_scores)

    def grouped(self, values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P,) pair values -> (B, K_max), -inf where an example has fewer options (pairs come in
        example order, each example's options together)."""
        group, batch_size = batch["group"], len(batch["labels"])
        counts = torch.bincount(group, minlength=batch_size)
        slot = torch.arange(len(group), device=group.device) - (counts.cumsum(0) - counts)[group]
        out = values.new_full((batch_size, int(counts.max())), float("-inf"))
        out[group, slot] = values
        return out

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.grouped(self.scores(model, batch), batch), batch["labels"])

    def evaluate_batches(self, model, batches):
        correct = {"acc": [], "acc_norm": []}
        predictions, references, losses = [], [], []
        for batch in batches:
            scores = self.scores(model, batch)
            raw = self.grouped(scores, batch)
            losses.append(F.cross_entropy(raw, batch["labels"], reduction="sum").item())
            choice = {"acc": raw.argmax(-1)}
            if self.causal:
                choice["acc_norm"] = self.grouped(scores / batch["option_chars"], batch).argmax(-1)
            for name, picked in choice.items():
                correct[name] += (picked == batch["labels"]).tolist()
            predictions += choice[self.metric_name].tolist()
            references += batch["labels"].tolist()
        metrics = {name: sum(hits) / len(hits) for name, hits in correct.items() if hits}
        return {**metrics, "loss": sum(losses) / max(len(references), 1),
                "predictions": predictions, "references": references}


def check_records(splits: dict[str, list[dict]]) -> None:
    """Every example has at least two options and an answer among them (one line naming the key)."""
    for split, records in splits.items():
        for i, record in enumerate(records):
            options = record.get("options") or []
            if len(options) < 2:
                raise ConfigError("task.options_column", f"{split} example {i} has {len(options)} option(s); "
                                  "allowed: 2 or more")
            if not 0 <= record["label"] < len(options):
                raise ConfigError("task.label_column", f"{split} example {i}: answer index {record['label']} is "
                                  f"outside its {len(options)} options; allowed: 0..{len(options) - 1}")
