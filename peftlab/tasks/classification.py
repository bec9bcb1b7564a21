"""Text classification on an encoder (a fresh head) or a causal LM (a verbalized prompt).

Encoder: ``logits = head(encoder(text))``, cross-entropy over the classes; a text pair
(``task.text_column: [first, second]``) is the tokenizer's pair encoding, ``[CLS] first [SEP]
second [SEP]`` with ``token_type_ids`` where the model has them, the longer side cut first.
Causal LM: the prompt (``task.prompt`` with ``{text}``; for a pair, its column names such as
``{passage}`` / ``{question}``, or ``{text}`` / ``{pair}``, the longest field cut to fit) is followed by the
label word (``task.verbalizer[label]``, one token each). Training is plain
next-token cross-entropy on that word; prediction compares the label words'
logits at the last prompt position, so accuracy means the same thing for both.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.tasks.base import Task, pad

METRICS_DIR = Path(__file__).parent / "metrics"
METRICS = ("accuracy", "f1", "f1_positive", "matthews")  # the headline; every one is reported


class ClassificationTask(Task):
    def __init__(self, cfg, tokenizer, arch, splits, facts):
        super().__init__(cfg, tokenizer, arch, splits, facts)
        if cfg.metric not in METRICS:
            raise ConfigError("task.metric", f"got {cfg.metric!r}; allowed for classification: {', '.join(METRICS)}")
        self.metric_name = cfg.metric
        every = [r["label"] for records in splits.values() for r in records]
        self.num_labels = len(cfg.labels) or 1 + max(every)
        trained = sorted({r["label"] for r in splits["train"]})
        if len(trained) < 2:
            names = [cfg.labels[i] if i < len(cfg.labels) else i for i in trained]
            raise ConfigError("task.label_column", f"the training split holds one class ({names}); a classifier "
                              "cannot learn from it; allowed: data with at least two classes")
        self.causal = arch.kind == "causal"
        if self.causal:
            self.label_tokens = self._label_tokens()
            self.head_text, _, self.tail_text = cfg.prompt.partition("{text}")
            self.tail_ids = tokenizer(self.tail_text, add_special_tokens=False)["input_ids"]
        self.encoded = {name: [self.encode(r) for r in records] for name, records in splits.items()}

    def _label_tokens(self) -> list[int]:
        words = list(self.cfg.verbalizer)
        if len(words) < self.num_labels:
            raise ConfigError("task.verbalizer", f"needs one word per class ({self.num_labels}); got {words}")
        ids = []
        for word in words:
            tokens = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ConfigError("task.verbalizer", f"{word!r} is {len(tokens)} tokens for this tokenizer; allowed: single-token words")
            ids.append(tokens[0])
        return ids

    def encode(self, record: dict):
        max_length = self.cfg.max_length
        if not self.causal:
            return (*encode_for_encoder(self.tokenizer, record, max_length), record["label"])
        if "pair" in record:
            prompt = self.pair_prompt(record)
        else:
            budget = max_length - len(self.tail_ids) - 1
            prompt = self.tokenizer(self.head_text + record["text"])["input_ids"][:budget] + self.tail_ids
        # input = prompt + label word; the logits at the last prompt position predict the word
        return prompt + [self.label_tokens[record["label"]]], len(prompt) - 1, record["label"]

    def pair_prompt(self, record: dict) -> list[int]:
        """The prompt's token ids for a text pair: every field filled in, the longest one cut so that
        the prompt and the label word fit ``task.max_length``."""
        fields = {"text": record["text"], "pair": record["pair"], **record.get("fields", {})}
        used = [name for name in fields if "{" + name + "}" in self.cfg.prompt]
        if not used:
            raise ConfigError("task.prompt", f"{self.cfg.prompt!r} names no field of the pair; allowed: "
                              f"{', '.join('{' + n + '}' for n in fields)}")
        cut = max(used, key=lambda name: len(fields[name]))
        head, _, tail = self.cfg.prompt.partition("{" + cut + "}")
        try:
            head_ids = self.tokenizer(head.format(**fields))["input_ids"]
            tail_ids = self.tokenizer(tail.format(**fields), add_special_tokens=False)["input_ids"]
        except KeyError as err:
            raise ConfigError("task.prompt", f"names {err} that no example has; allowed: "
                              f"{', '.join('{' + n + '}' for n in fields)}") from None
        value_ids = self.tokenizer(fields[cut], add_special_tokens=False)["input_ids"]
        budget = self.cfg.max_length - len(head_ids) - len(tail_ids) - 1
        return head_ids + value_ids[:max(budget, 0)] + tail_ids

    def collate(self, examples):
        if not self.causal:
            ids, mask = pad([e[0] for e in examples], self.tokenizer.pad_token_id)
            batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e[2] for e in examples])}
            if examples[0][1] is not None:
                batch["token_type_ids"] = pad([e[1] for e in examples], 0)[0]
            return batch
        ids, mask = pad([e[0] for e in examples], self.tokenizer.pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "positions": torch.tensor([e[1] for e in examples]),
            "labels": torch.tensor([e[2] for e in examples]),
        }

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, class scores (B, num_labels))."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits
        if not self.causal:
            return F.cross_entropy(logits.float(), batch["labels"]), logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        at_answer = logits[rows, batch["positions"]].float()  # (B, V)
        targets = torch.tensor(self.label_tokens, device=logits.device)[batch["labels"]]
        return F.cross_entropy(at_answer, targets), at_answer[:, self.label_tokens]

    def loss(self, model, batch):
        return self.forward(model, batch)[0]

    def evaluate_batches(self, model, batches):
        predictions, references, losses = [], [], []
        for batch in batches:
            loss, scores = self.forward(model, batch)
            losses.append(loss.item() * len(batch["labels"]))
            predictions += scores.argmax(-1).tolist()
            references += batch["labels"].tolist()
        return {
            **compute_metric(self.metric_name, predictions, references),
            **diagnostics(predictions, references, self.num_labels, list(self.cfg.labels)),
            "loss": sum(losses) / max(len(references), 1),
            # per example, in split order (run() moves both lists out of result.json into predictions.json)
            "predictions": predictions,
            "references": references,
        }


def encode_for_encoder(tokenizer, record: dict, max_length: int) -> tuple[list[int], list[int] | None]:
    """(input ids, token type ids or None): one text, or a pair as ``[CLS] a [SEP] b [SEP]`` with the
    longer side cut first."""
    texts = (record["text"], record["pair"]) if "pair" in record else (record["text"],)
    enc = tokenizer(*texts, truncation="longest_first", max_length=max_length)
    return enc["input_ids"], enc.get("token_type_ids")


def compute_metric(name: str, predictions: list[int], references: list[int]) -> dict[str, float]:
    """The headline metric: accuracy (the shipped evaluate module), macro-F1, F1 of class 1, or
    Matthews correlation (CoLA's)."""
    if name == "accuracy":
        import evaluate

        return evaluate.load(str(METRICS_DIR / "accuracy.py")).compute(predictions=predictions, references=references)
    from sklearn.metrics import f1_score, matthews_corrcoef

    if name == "f1_positive":
        return {"f1_positive": float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0))}
    if name == "matthews":
        return {"matthews": float(matthews_corrcoef(references, predictions))}
    return {"f1": float(f1_score(references, predictions, average="macro"))}


def diagnostics(predictions: list[int], references: list[int], num_labels: int, names: list) -> dict:
    """What reading a classification result needs beside its headline: the majority-class rate of the
    split (what always guessing its most frequent class scores), recall per class (a class the model
    never predicts shows as 0), macro-F1 and Matthews correlation."""
    from collections import Counter

    from sklearn.metrics import f1_score, matthews_corrcoef

    if not references:
        return {}
    counts = Counter(references)
    label = lambda i: str(names[i]) if i < len(names) else str(i)  # noqa: E731
    recall = {label(c): sum(p == y == c for p, y in zip(predictions, references)) / n for c, n in sorted(counts.items())}
    return {"majority_rate": max(counts.values()) / len(references), "majority_class": label(counts.most_common(1)[0][0]),
            "recall": recall, "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(references, predictions)) if len(set(references) | set(predictions)) > 1 else 0.0}
