"""Budget matching: size every method to the same number of trainable parameters.

    budget=100000 ──► method.size_key (r, bottleneck, num_virtual_tokens, init_r)
                  ──► the value whose trainable count is closest to 100,000 (within 5%)

Comparisons of PEFT methods are fair at an equal trainable-parameter count (LoRA
paper, Table 5: every method at about 18M). A method declares its size knob
(``Method.size_key``) and how to set it (``Method.size_fields``);
``Method.planned_trainable`` counts what ``apply`` would train — a dry run on a
meta-device copy of the model, so a probe costs milliseconds even on a 135M model
(prompt tuning, which copies vocabulary embeddings, and QLoRA, which quantizes real
weights, count by their own override). Counts grow with the knob, so the value is
found by doubling and then bisection (about 2·log2(max) probes), then checked
against its neighbours (LoKr's count dips once, where W2 switches to full storage).
What is counted is exactly ``params.trainable`` of ``result.json``: the method's
own parameters, not the task head.

Methods with a fixed size (full, bitfit, ia3) keep it: the match records their
count and how far it is from the budget, and the run goes on (they are the
baselines a budget sweep is compared with). A budget that no size reaches within
5% is bad input (``ConfigError('budget', ...)``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods.base import Method

log = logging.getLogger(__name__)
TOLERANCE = 0.05     # a match lands within 5% of the budget
MAX_SIZE = 2 ** 24   # search ceiling for knobs with no upper limit (LoHa's r, prompt length on RoPE models)


@dataclass
class BudgetMatch:
    """What ``result.json`` records under ``budget``."""

    target: int              # the budget asked for
    key: str | None          # the config key that was set, e.g. "method.r"; None for a fixed-size method
    value: int | None        # its chosen value
    trainable: int           # the method's trainable parameters at that value
    error_pct: float         # 100 · (trainable − target) / target

    def to_dict(self) -> dict:
        return asdict(self)


def error_pct(trainable: int, target: int) -> float:
    return 100.0 * (trainable - target) / target


def match_budget(method: Method, model: nn.Module, arch: Any, budget: int) -> tuple[Method, BudgetMatch]:
    """(the method resized to the budget, the match); ConfigError('budget', ...) if none fits within 5%."""
    if method.size_key is None:
        trainable = method.planned_trainable(model, arch)
        match = BudgetMatch(budget, None, None, trainable, error_pct(trainable, budget))
        log.warning("budget: method %s has a fixed size (%s trainable, %+.1f%% from the budget %s)",
                    method.name, f"{trainable:,}", match.error_pct, f"{budget:,}")
        return method, match
    counts: dict[int, int | None] = {}

    def trainable_at(value: int) -> int | None:
        """The count at ``value``, or None where the method refuses that size (too large for the model)."""
        if value not in counts:
            try:
                counts[value] = method.resized(value).planned_trainable(model, arch)
            except ConfigError:
                counts[value] = None
        return counts[value]

    counts[1] = method.resized(1).planned_trainable(model, arch)  # a size-independent bad config raises here
    top = largest_useful_size(trainable_at, budget)
    above = first_true(lambda v: trainable_at(v) >= min(budget, trainable_at(top)), 1, top)
    value = closest_nearby(trainable_at, budget, above)
    trainable = trainable_at(value)
    match = BudgetMatch(budget, f"method.{method.size_key}", value, trainable, error_pct(trainable, budget))
    if abs(match.error_pct) > 100 * TOLERANCE:
        raise ConfigError("budget", no_fit_message(method, budget, bracket(trainable_at, budget, value)))
    return method.resized(value), match


def largest_useful_size(trainable_at: Callable[[int], int | None], budget: int) -> int:
    """The size beyond which searching is useless: the first power of two whose count reaches the
    budget, else the largest size the method accepts, the start of a plateau, or ``MAX_SIZE``."""
    value = 1
    while value < MAX_SIZE and trainable_at(value) < budget:
        bigger = value * 2
        if trainable_at(bigger) is None:  # too large for the model: the limit lies in (value, bigger)
            return first_true(lambda v: trainable_at(v + 1) is None, value, bigger - 1)
        if trainable_at(bigger) == trainable_at(value):  # a plateau (LoKr: both factors full)
            return bigger
        value = bigger
    return value


def first_true(predicate: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest v in [low, high] with predicate(v), for a predicate false then true (high if none)."""
    while low < high:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle + 1
    return low


def closest_nearby(trainable_at: Callable[[int], int | None], budget: int, value: int) -> int:
    """Step to a neighbouring size while it is closer to the budget (on a tie, while it is smaller).
    Counts can dip where a method changes form (LoKr stores W2 in full from r = max(W2's dims) / 2
    on, which can be fewer parameters than the rank-r form just below), so the bisection's answer
    is checked locally."""
    def rank(v: int) -> tuple[float, int]:
        count = trainable_at(v) if v >= 1 else None
        return (math.inf if count is None else abs(count - budget), v)

    while True:
        step = min((value - 1, value + 1), key=rank)
        if rank(step) >= rank(value):
            return value
        value = step


def bracket(trainable_at: Callable[[int], int | None], budget: int, value: int) -> dict[int, int]:
    """Size -> count of ``value`` and of its neighbour on the other side of the budget, if there is one."""
    nearest = {value: trainable_at(value)}
    side = value + 1 if nearest[value] < budget else value - 1
    other = trainable_at(side) if side >= 1 else None
    if other is not None and (other - budget) * (nearest[value] - budget) < 0:
        nearest[side] = other
    return nearest


def no_fit_message(method: Method, budget: int, nearest: dict[int, int]) -> str:
    """One line: the budget, the counts nearest to it, and the budgets that would fit."""
    key = f"method.{method.size_key}"
    counts = ", ".join(f"{key}={v} trains {c:,}" for v, c in sorted(nearest.items()))
    if len(nearest) == 2:  # the budget falls between two sizes
        allowed = f"a budget within {TOLERANCE:.0%} of one of these counts"
    else:  # the budget lies beyond every size on one side
        [(value, count)] = nearest.items()
        if budget < count:
            allowed = f"a budget >= {math.ceil(count / (1 + TOLERANCE)):,} ({key}={value} trains the fewest)"
        else:
            allowed = f"a budget <= {math.floor(count / (1 - TOLERANCE)):,} ({key}={value} trains the most)"
    return f"got {budget:,}, and no size of {method.name} lands within {TOLERANCE:.0%}: {counts}; allowed: {allowed}"


__all__ = ["BudgetMatch", "TOLERANCE", "match_budget"]
