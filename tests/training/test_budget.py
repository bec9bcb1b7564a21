"""Budget matching: each method's size lands within 5% of a trainable-parameter budget.

The oracle is independent of the search: the method is really applied (no meta
device) at every size, and the chosen size must be the one whose real count is
closest to the budget; where none is within 5% the budget must be refused.
"""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, requires_bitsandbytes
from peftlab.training.budget import TOLERANCE, match_budget
from peftlab.cli import main
from peftlab.config import compose, validate
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.methods.base import count

SIZED = ["lora", "dora", "loha", "lokr", "vera", "adapter", "prefix", "prompt", "adalora"]  # rslora, loraplus: as lora
FIXED = ["full", "bitfit", "ia3"]
BUDGETS = [40, 120, 150, 200, 250, 300, 700, 2500, 6000]  # 250: LoKr on gpt2 dips (r=5: 264, r=6: 256)


def arch_for(family: str, max_length: int = 16) -> SimpleNamespace:
    return SimpleNamespace(kind="encoder" if family == "bert" else "causal", max_length=max_length)


def method_of(name: str, **fields):
    cls = METHODS[name]
    return cls(cls.config_class(**fields))


def real_count(method, model, arch) -> int:
    """Trainable parameters after really applying ``method`` to a copy of ``model`` (== its closed form)."""
    adapted = method.apply(copy.deepcopy(model), arch)
    trainable = count(method.trainable_parameters(adapted))
    assert trainable == method.expected_trainable(adapted)
    return trainable


def real_counts(method, model, arch, ceiling: int) -> dict[int, int]:
    """Size -> real count, from 1 until the method refuses the size, the count passes ``ceiling``
    or stops growing (LoKr, once both Kronecker factors are stored in full)."""
    counts = {}
    value = 1
    while True:
        try:
            counts[value] = real_count(method.resized(value), model, arch)
        except ConfigError:
            return counts
        if counts[value] > ceiling or counts[value] == counts.get(value - 1):
            return counts
        value += 1


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", SIZED)
def test_chosen_size_is_the_closest_real_count_within_tolerance(family, name):
    model, arch = TINY[family](), arch_for(family)
    method = method_of(name)
    counts = real_counts(method, model, arch, ceiling=max(BUDGETS))
    matched = 0
    for budget in BUDGETS:
        best = min(counts, key=lambda v: (abs(counts[v] - budget), v))
        if abs(counts[best] - budget) <= TOLERANCE * budget:
            sized, match = match_budget(method, model, arch, budget)
            assert (match.value, match.trainable) == (best, counts[best]), budget
            assert match.key == f"method.{method.size_key}" and match.target == budget
            assert match.error_pct == pytest.approx(100 * (counts[best] - budget) / budget)
            assert real_count(sized, model, arch) == match.trainable  # the returned method has that size
            matched += 1
        else:
            with pytest.raises(ConfigError, match=r"^budget: got [\d,]+, and no size of .*; allowed: "):
                match_budget(method, model, arch, budget)
    assert matched >= 1, counts  # the budgets above exercise the matching branch for every method


@pytest.mark.parametrize("name", FIXED)
def test_fixed_size_methods_keep_their_size_and_record_the_gap(name):
    model, arch = TINY["bert"](), arch_for("bert")
    method = method_of(name)
    same, match = match_budget(method, model, arch, 1000)
    assert same is method
    assert (match.key, match.value) == (None, None)
    assert match.trainable == real_count(method, model, arch)
    assert match.error_pct == pytest.approx(100 * (match.trainable - 1000) / 1000)


def test_budget_too_small_or_too_large_names_the_reachable_range():
    model, arch = TINY["bert"](), arch_for("bert")
    lora = method_of("lora")  # q, v of 2 layers, each 32 × 32: 4 × r(32 + 32) = 256 r, r <= 32
    with pytest.raises(ConfigError, match=r"^budget: got 10, .*method\.r=1 trains 256; allowed: a budget >= 244 "):
        match_budget(lora, model, arch, 10)
    with pytest.raises(ConfigError, match=r"^budget: got 10,000, .*method\.r=32 trains 8,192; allowed: a budget "
                                          r"<= 8,623 \(method\.r=32 trains the most\)$"):
        match_budget(lora, model, arch, 10_000)


def test_adalora_budget_sets_init_r_and_keeps_the_target_ratio():
    model, arch = TINY["bert"](), arch_for("bert")
    sized, match = match_budget(method_of("adalora", init_r=12, target_r=8), model, arch, 1300)
    assert match.key == "method.init_r"
    assert sized.config.init_r == match.value == 5  # 4 matrices × init_r (32 + 32 + 1) = 260 init_r
    assert sized.config.target_r == 3               # round(5 × 8 / 12)


def test_adapter_budget_sets_bottleneck_and_drops_reduction_factor():
    model, arch = TINY["bert"](), arch_for("bert")
    sized, match = match_budget(method_of("adapter"), model, arch, 650)
    assert (sized.config.bottleneck, sized.config.reduction_factor) == (match.value, None)


def test_matching_leaves_the_model_and_the_random_stream_alone():
    model, arch = TINY["llama"](), arch_for("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    state = torch.random.get_rng_state()
    match_budget(method_of("prefix"), model, arch, 2000)  # prefix draws its init from the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)


@requires_bitsandbytes
def test_qlora_is_matched_as_lora():
    model, arch = TINY["llama"](), arch_for("llama")
    _, qlora = match_budget(method_of("qlora", targets=["q", "v"]), model, arch, 1120)
    _, lora = match_budget(method_of("lora"), model, arch, 1120)  # 2 layers × r(32 + 32 + 32 + 16) = 224 r
    assert (qlora.value, qlora.trainable) == (lora.value, lora.trainable)


@pytest.mark.parametrize("value,expected", [(None, None), (0, None), (100000, 100000), (1e5, 100000)])
def test_budget_config_values(value, expected):
    cfg = compose(["trainer.max_steps=1"])
    cfg.budget = value
    assert validate(cfg).budget == expected


@pytest.mark.parametrize("value", ["-5", "abc", "1.5", "true"])
def test_bad_budget_fails_before_loading_with_one_line(capsys, tmp_path, value):
    code = main(["train", f"out_dir={tmp_path}", f"budget={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.match(r"^error: budget: got .*; allowed: a whole number of trainable parameters >= 1, or null / 0",
                    err[0]), err[0]


# --------------------------------------------------------------------------- #
# The real minilm (22.7M, BERT 6 × 384): no training, only counting
# --------------------------------------------------------------------------- #
MINILM_CASES = [  # (method, its config, budget, the size the closed form gives)
    ("lora", {}, 100_000, 11),               # 12 matrices × r(384 + 384) = 9216 r
    ("rslora", {}, 1_000_000, 109),
    ("loraplus", {}, 100_000, 11),
    ("dora", {}, 100_000, 10),               # 9216 r + 12 × 384 magnitudes
    ("loha", {}, 200_000, 11),               # 2 × 9216 r
    ("lokr", {}, 5_000, 3),                  # 12 × (16·16 + r(24 + 24)) for r < 12
    ("lokr", {}, 9_000, 10),
    ("vera", {}, 6_000, 116),                # 12 × (384 + r)
    ("vera", {}, 9_000, 366),
    ("adapter", {}, 100_000, 10),            # 12 adapters × (2·384 m + m + 384)
    ("adapter", {}, 1_000_000, 108),
    ("prefix", {}, 2_000_000, 203),          # MLP (1,921,536) + 384 n
    ("prefix", {"prefix_projection": False}, 100_000, 22),  # 6 layers × 2 × 384 n
    ("prompt", {}, 20_000, 52),              # 384 n
    ("prompt", {}, 100_000, 260),
    ("adalora", {}, 100_000, 11),            # 12 × r(384 + 384 + 1)
    ("adalora", {}, 1_000_000, 108),
]


@pytest.fixture(scope="module")
def minilm():
    from peftlab.models.loading import load_model

    cfg = validate(compose(["model=minilm"]))
    model, _, arch = load_model(cfg.model, cfg.task.type, 2)
    arch.max_length = cfg.task.max_length
    return model, arch


@pytest.mark.slow
@pytest.mark.parametrize("name,fields,budget,expected", MINILM_CASES,
                         ids=[f"{c[0]}-{c[2]}{'-noproj' if c[1] else ''}" for c in MINILM_CASES])
def test_minilm_lands_within_tolerance_and_apply_agrees(minilm, name, fields, budget, expected):
    model, arch = minilm
    sized, match = match_budget(method_of(name, **fields), model, arch, budget)
    assert match.value == expected
    assert abs(match.trainable - budget) <= TOLERANCE * budget
    assert real_count(sized, model, arch) == match.trainable


@pytest.mark.slow
def test_run_records_the_budget_and_trains_that_size(tmp_path):
    from peftlab.reporting.runs import load_run
    from peftlab.training.trainer import run

    cfg = compose(["method=dora", "budget=100000", "trainer.max_steps=1", "trainer.batch_size=4",
                   "trainer.eval_before=false", "task.max_train_examples=16", "task.max_eval_examples=8",
                   "trainer.progress=false"])
    result = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["status"] == "ok"
    assert on_disk["budget"] == {"target": 100_000, "key": "method.r", "value": 10, "trainable": 96_768,
                                 "error_pct": pytest.approx(-3.232)}
    assert on_disk["params"]["trainable"] == on_disk["params"]["expected_trainable"] == 96_768
    assert on_disk["method"]["config"]["r"] == on_disk["config"]["method"]["r"] == 10
    assert result["method"]["summary"]["ranks"] and set(result["method"]["summary"]["ranks"].values()) == {10}
    _, method, _ = load_run(tmp_path)  # the saved adapter describes the size that trained
    assert method.config.r == 10


@pytest.mark.slow
def test_unreachable_budget_stops_before_training_with_one_line(capsys, tmp_path):
    code = main(["train", f"out_dir={tmp_path}", "method=vera", "budget=100000", "trainer.max_steps=1",
                 "trainer.progress=false"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert lines == ["error: budget: got 100,000, and no size of vera lands within 5%: method.r=384 trains 9,216; "
                     "allowed: a budget <= 9,701 (method.r=384 trains the most)"]
    result = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert result["status"] == "failed" and "train" not in result
