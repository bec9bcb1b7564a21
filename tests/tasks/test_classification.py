"""What a classification result reports besides its headline: the majority-class rate, recall per
class, macro-F1 and Matthews correlation, against scikit-learn; the headline may be any of them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.tasks.classification import ClassificationTask, compute_metric, diagnostics

REFS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
PREDS = [0, 1, 0, 1, 1, 0, 0, 2, 2, 0]


def test_diagnostics_equal_closed_forms_and_sklearn():
    d = diagnostics(PREDS, REFS, 3, ["neg", "neutral", "pos"])
    assert d["majority_rate"] == 0.5 and d["majority_class"] == "pos"
    assert d["recall"] == {"neg": pytest.approx(2 / 3), "neutral": 1.0, "pos": pytest.approx(2 / 5)}
    assert d["macro_f1"] == pytest.approx(f1_score(REFS, PREDS, average="macro"))
    assert d["mcc"] == pytest.approx(matthews_corrcoef(REFS, PREDS))
    never = diagnostics([0] * 4, [0, 1, 0, 1], 2, [])  # a model that always says class 0
    assert never["recall"] == {"0": 1.0, "1": 0.0} and never["mcc"] == 0.0


@pytest.mark.parametrize("name,reference", [
    ("f1_positive", lambda: f1_score([0, 1, 1, 0], [0, 1, 0, 0])),
    ("matthews", lambda: matthews_corrcoef([0, 1, 1, 0], [0, 1, 0, 0])),
    ("f1", lambda: f1_score([0, 1, 1, 0], [0, 1, 0, 0], average="macro")),
])
def test_headline_metrics(name, reference):
    assert compute_metric(name, [0, 1, 0, 0], [0, 1, 1, 0]) == {name: pytest.approx(reference())}


def test_an_unknown_headline_names_the_key():
    cfg = TaskConfig(metric="auroc")
    with pytest.raises(ConfigError) as err:
        ClassificationTask(cfg, None, SimpleNamespace(kind="encoder"), {"train": [{"text": "a", "label": 0}]}, {})
    assert err.value.key == "task.metric" and "matthews" in err.value.message


def test_evaluation_reports_them_for_a_split(minilm_tokenizer):
    records = [{"text": f"review {i}", "label": i % 2} for i in range(6)]
    task = ClassificationTask(TaskConfig(labels=["rotten", "fresh"], max_length=16), minilm_tokenizer,
                              SimpleNamespace(kind="encoder"), {"train": records, "test": records[:5]}, {})

    class Constant(torch.nn.Module):  # always "fresh"
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2))

    metrics = task.evaluate_batches(Constant(), iter([task.collate(task.encoded["test"])]))
    assert metrics["accuracy"] == pytest.approx(2 / 5) and metrics["majority_rate"] == pytest.approx(3 / 5)
    assert metrics["recall"] == {"rotten": 0.0, "fresh": 1.0} and metrics["majority_class"] == "rotten"
