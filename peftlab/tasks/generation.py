"""Generation (instruction tuning / SFT): a prompt, a completion, greedy decoding scored by an answer rule.

Records are ``{"text": str, "completion": str[, "fields": {name: str}]}``; ``task.prompt`` is filled
with ``{text}`` and the record's fields (``"{passage} {question}"``). Causal LMs only.

    prompt ids     = chat template (user turn = the prompt, then the assistant header:
                     ``apply_chat_template(..., add_generation_prompt=True)``)   when used, else tokenizer(prompt)
    completion ids = tokenizer(completion) + [eos]
    training input = prompt ids + completion ids (right-padded); labels -100 on the prompt and on pads
    loss           = Σ CE(next token) over completion tokens / their count (a token-weighted mean;
                     ``loss_units`` counts those tokens, so shards of a batch weigh right)

``task.chat_template``: ``auto`` uses the tokenizer's template when it has one (``tokenizer.chat_template``),
``true`` requires one, ``false`` never uses it. When prompt + completion exceed ``task.max_length`` the prompt
loses tokens from its left (counted in the data facts as ``prompts_cut``) and the completion its end.

Evaluation: batched greedy decoding of the prompts, left-padded, with the KV cache
(``model.generate(do_sample=False, max_new_tokens=task.max_new_tokens)``), each row stopping at eos or when
its text holds ``task.stop``; the text is cut at the stop string, then ``task.answer`` extracts the answer:

    text          the whole (stripped) text
    last_number   the last number in it ("There are 9 apples." -> "9"; "1,000" -> "1000"; digits inside
                  "3:30", "6th", "x2", "5/2" are not numbers)
    regex:<p>     the first match of <p> (its group 1 when it has groups)

The same rule is applied to the reference (the record's completion; the whole of it when the rule finds
nothing). Per example:

    exact_match    normalise(answer(generated)) == normalise(answer(reference))   (lower case, white space
                   collapsed, surrounding punctuation stripped; no answer found = wrong)
    numeric_match  when both answers hold a number: their last numbers are equal as numbers
                   ("9.0" == "9", "9 apples" vs "9"); otherwise exact_match

Both are reported with the completion loss; ``task.metric`` names the headline, whose per-example
outcome (1 right, 0 wrong) goes to ``predictions`` with ``references`` all 1, so ``peftlab paired`` can
compare runs example by example; ``samples`` keeps the first five {prompt, generated, reference}.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import ConfigError
from peftlab.tasks.base import Task, pad

METRICS = ("exact_match", "numeric_match")
CHAT_TEMPLATE = ("auto", True, False)
NUMBER = re.compile(r"(?<![\w.:,/])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w:/]|[.,]\d)")
SAMPLES = 5


# --------------------------------------------------------------------------- answers and matching
def numbers_in(text: str) -> list[str]:
    """The plain numbers in ``text``, thousands separators removed ("1,250" -> "1250")."""
    return [m.group(0).replace(",", "") for m in NUMBER.finditer(text)]


def answer_rule(spec: str):
    """``task.answer`` -> a function text -> answer (None when the rule finds none)."""
    if spec == "text":
        return lambda text: text.strip() or None
    if spec == "last_number":
        return lambda text: (numbers_in(text) or [None])[-1]
    if isinstance(spec, str) and spec.startswith("regex:") and spec[len("regex:"):]:
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as err:
            raise ConfigError("task.answer", f"{spec!r} is not a valid regular expression: {err}") from None

        def extract(text: str):
            match = pattern.search(text)
            if match is None:
                return None
            return (match.group(1) if pattern.groups else match.group(0)).strip()
        return extract
    raise ConfigError("task.answer", f"got {spec!r}; allowed: text, last_number, regex:<pattern>")


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def as_number(text: str | None) -> float | None:
    found = numbers_in(text) if text else []
    return float(found[-1]) if found else None


def match(generated: str, reference: str, rule) -> tuple[int, int]:
    """(exact_match, numeric_match) of one generated text against its reference, under ``rule``."""
    answer = rule(generated)
    expected = rule(reference) or reference.strip()
    if answer is None:
        return 0, 0
    exact = int(normalise(answer) == normalise(expected))
    a, b = as_number(answer), as_number(expected)
    if a is None or b is None:
        return exact, exact
    return exact, int(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))


def cut_at(text: str, stop: str | None) -> str:
    return (text.split(stop, 1)[0] if stop else text).strip()


class StopOnString:
    """A stopping criterion: each row is done once its generated text (after ``start``) holds ``stop``."""

    def __init__(self, tokenizer, stop: str, start: int):
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- the task
class GenerationTask(Task):
    metric_name = "exact_match"

    def __init__(self, cfg, tokenizer, arch, splits, facts):
        super().__init__(cfg, tokenizer, arch, splits, facts)
        if arch.kind != "causal":
            raise ConfigError("task.type", f"generation needs a causal LM; model {arch.name!r} is an encoder "
                              "(allowed for encoders: classification, multiple_choice)")
        if cfg.metric not in METRICS:
            raise ConfigError("task.metric", f"got {cfg.metric!r}; allowed for generation: {', '.join(METRICS)}")
        self.metric_name = cfg.metric
        self.rule = answer_rule(cfg.answer)
        if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
            raise ConfigError("task.max_new_tokens", f"got {cfg.max_new_tokens!r}; allowed: an integer >= 1")
        if cfg.stop is not None and (not isinstance(cfg.stop, str) or not cfg.stop):
            raise ConfigError("task.stop", f"got {cfg.stop!r}; allowed: a non-empty string, or null (eos only)")
        self.use_chat = self._chat_switch(cfg.chat_template)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        check_records(splits, cfg)
        self.examples: list[dict] = []  # every split's records, indexed by the uid an encoded example holds
        self.cut = 0
        self.encoded = {name: [self.encode(r) for r in records] for name, records in splits.items()}
        self.facts = {**facts, "chat_template": self.use_chat, "prompts_cut": self.cut}

    def _chat_switch(self, value) -> bool:
        value = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
        if value not in CHAT_TEMPLATE or value is None:
            raise ConfigError("task.chat_template", f"got {value!r}; allowed: auto, true, false")
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if value is True and not has:
            raise ConfigError("task.chat_template", f"true, but the tokenizer of {self.arch.name!r} has no chat "
                              "template; allowed: auto, false")
        return has if value == "auto" else bool(value)

    def prompt_text(self, record: dict) -> str:
        fields = {"text": record["text"], **record.get("fields", {})}
        try:
            return self.cfg.prompt.format(**fields)
        except (KeyError, IndexError) as err:
            raise ConfigError("task.prompt", f"{self.cfg.prompt!r} names {err} that no example has; allowed: "
                              f"{', '.join('{' + n + '}' for n in fields)}") from None

    def prompt_ids(self, text: str) -> list[int]:
        if not self.use_chat:
            return list(self.tokenizer(text)["input_ids"])
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def encode(self, record: dict) -> tuple[list[int], list[int], int]:
        """(prompt ids, completion ids, uid)."""
        limit = self.cfg.max_length
        prompt = self.prompt_text(record)
        prompt_ids = self.prompt_ids(prompt)
        completion_ids = list(self.tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
        completion_ids = (completion_ids + self.eos)[: max(limit - 1, 1)]
        room = limit - len(completion_ids)
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[-room:]
            self.cut += 1
        uid = len(self.examples)
        self.examples.append({"prompt": prompt, "reference": record["completion"]})
        return prompt_ids, completion_ids, uid

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """Training tensors (prompt + completion, right-padded, labels -100 off the completion) and the
        prompts alone, left-padded, for generation."""
        ids, mask = pad([p + c for p, c, _ in examples], self.pad_id)
        labels = torch.full_like(ids, -100)
        for row, (p, c, _) in enumerate(examples):
            labels[row, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        prompts = [p for p, _, _ in examples]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            prompt_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[row, width - len(p):] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask, "uid": torch.tensor([u for _, _, u in examples])}

    def loss_sum(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        """(sum of next-token CE over completion tokens, their count)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        losses = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
        return losses, int(keep.sum())

    def loss(self, model, batch):
        total, n = self.loss_sum(model, batch)
        return total / max(n, 1)

    def loss_units(self, batch):
        """The loss is a mean over completion tokens (the ones that have a label)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def generate(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Greedy, batched, left-padded, KV-cached decoding -> each row's text cut at ``task.stop``."""
        from transformers import StoppingCriteriaList

        width = prompt_ids.shape[1]
        stopping = StoppingCriteriaList([StopOnString(self.tokenizer, self.cfg.stop, width)]) if self.cfg.stop else None
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                             max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad_id,
                             eos_token_id=self.eos or None, stopping_criteria=stopping, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [cut_at(t, self.cfg.stop) for t in texts]

    def evaluate_batches(self, model, batches):
        exact, numeric, answered, samples = [], [], 0, []
        total, tokens = 0.0, 0
        for batch in batches:
            s, k = self.loss_sum(model, batch)
            total, tokens = total + s.item(), tokens + k
            for uid, text in zip(batch["uid"].tolist(), self.generate(model, batch["prompt_ids"], batch["prompt_mask"])):
                reference = self.examples[uid]["reference"]
                e, n = match(text, reference, self.rule)
                exact.append(e)
                numeric.append(n)
                answered += self.rule(text) is not None
                if len(samples) < SAMPLES:
                    samples.append({"prompt": self.examples[uid]["prompt"], "generated": text, "reference": reference})
        count = max(len(exact), 1)
        headline = exact if self.metric_name == "exact_match" else numeric
        return {"exact_match": sum(exact) / count, "numeric_match": sum(numeric) / count,
                "answered": answered / count, "loss": total / max(tokens, 1), "tokens": tokens,
                "samples": samples, "predictions": headline, "references": [1] * len(headline)}


def check_records(splits: dict[str, list[dict]], cfg) -> None:
    """Every example has a completion text (one line naming the key)."""
    for split, records in splits.items():
        for i, record in enumerate(records):
            if not isinstance(record.get("completion"), str) or not record["completion"].strip():
                raise ConfigError("task.source", f"{split} example {i} of source {cfg.source!r} has no completion "
                                  f"text; allowed: a source whose records hold one (asdiv, arithmetic_gen)")
