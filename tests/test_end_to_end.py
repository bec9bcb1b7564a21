"""Short runs on the real shipped models write a valid result.json and a loadable adapter."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab.config import compose
from peftlab.reporting.runs import load_run
from peftlab.training.trainer import run

pytestmark = pytest.mark.slow

REQUIRED = ["status", "reason", "method", "task", "model", "seed", "config", "params", "metrics", "train", "memory",
            "data", "provenance", "adapter", "wall_time_s"]


def check_result(result: dict, run_dir):
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["reason"] is None
    for key in REQUIRED:
        assert key in on_disk, key
    params = on_disk["params"]
    assert params["trainable"] == params["expected_trainable"] > 0
    assert params["total"] >= params["base_total"] > params["trainable"]
    for when in ("before", "after"):
        for split in ("validation", "test"):
            assert on_disk["metrics"][when][split]["n"] > 0
    assert on_disk["train"]["steps"] == on_disk["train"]["planned_steps"]
    assert on_disk["train"]["tokens_per_s"] > 0 and on_disk["memory"]["peak_bytes"] > 0
    assert len(on_disk["data"]["hash"]) == 16
    assert on_disk["provenance"]["versions"]["torch"]
    assert "git_sha" in on_disk["provenance"] and "git_dirty" in on_disk["provenance"]
    assert (run_dir / "adapter" / "adapter.safetensors").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and {"loss", "lr", "tokens_per_s"} <= set(rows[0])
    if on_disk["task"]["type"] == "classification":  # per-example predictions: out of result.json, into predictions.json
        predictions = json.loads((run_dir / "predictions.json").read_text())
        assert predictions["labels"] == [str(x) for x in on_disk["config"]["task"]["labels"]]  # class index -> name
        for when in ("before", "after"):
            for split in ("validation", "test"):
                metrics = on_disk["metrics"][when][split]
                assert "predictions" not in metrics and "references" not in metrics
                labels, predicted = predictions["references"][split], predictions[when][split]
                assert len(labels) == len(predicted) == metrics["n"]
                assert sum(p == y for p, y in zip(predicted, labels)) / len(labels) == pytest.approx(metrics["accuracy"])
    return on_disk


def test_minilm_sentiment_lora_run_and_reload(tmp_path):
    cfg = compose(["model=minilm", "task=sentiment", "method=lora", "trainer.max_steps=3", "trainer.batch_size=8",
                   "task.max_eval_examples=32", "trainer.progress=false"])
    result = check_result(run(cfg, tmp_path), tmp_path)
    assert result["params"]["trainable"] == 6 * 2 * 8 * (384 + 384)  # 6 layers × {q, v} × r(in + out)
    assert result["params"]["head"] == 384 * 2 + 2
    # the saved adapter + head reproduce the tuned model's predictions
    model, method, _ = load_run(tmp_path)
    assert set(method.layers(model)) and all(not layer.merged for layer in method.layers(model).values())
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        unmerged = model(**batch).logits
        method.merge(model)
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_smollm2_sentiment_lora_run(tmp_path):
    cfg = compose(["model=smollm2-135m", "task=sentiment", "method=lora", "trainer.max_steps=2", "trainer.batch_size=4",
                   "task.max_length=48", "task.max_eval_examples=16", "trainer.progress=false"])
    result = check_result(run(cfg, tmp_path), tmp_path)
    assert result["model"]["family"] == "llama" and result["params"]["head"] == 0
    assert result["params"]["trainable"] == 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576->576, v: 576->192


def test_smollm2_lm_task_reports_perplexity(tmp_path):
    cfg = compose(["model=smollm2-135m", "task=lm", "method=lora", "trainer.max_steps=2", "trainer.batch_size=4",
                   "task.max_length=32", "task.max_eval_examples=8", "trainer.progress=false"])
    result = check_result(run(cfg, tmp_path), tmp_path)
    test_after = result["metrics"]["after"]["test"]
    assert result["task"]["metric"] == "perplexity" and test_after["perplexity"] > 1.0


def test_lora_learns_sentiment_on_minilm(tmp_path):
    """A short run on real data learns: tuned test accuracy clearly above the fresh-head base."""
    cfg = compose(["+experiment=demo", "trainer.max_steps=120", "trainer.batch_size=16", "task.max_eval_examples=300",
                   "trainer.progress=false", "trainer.eval_batch_size=100", "trainer.threads=0"])
    result = run(cfg, tmp_path)
    before = result["metrics"]["before"]["test"]["accuracy"]
    after = result["metrics"]["after"]["test"]["accuracy"]
    assert after > max(before, 0.62) + 0.03, (before, after)


@pytest.mark.parametrize("model", ["minilm", "smollm2-135m"])
def test_boolq_sentence_pairs_on_both_model_kinds(tmp_path, model):
    cfg = compose([f"model={model}", "task=boolq", "method=lora", "trainer.max_steps=2", "trainer.batch_size=4",
                   "task.max_length=64", "task.max_eval_examples=8", "trainer.progress=false"])
    result = check_result(run(cfg, tmp_path), tmp_path)
    assert result["data"]["sizes"]["test"] == 3270 and result["data"]["given_splits"] == ["test", "train"]
    assert result["metrics"]["after"]["test"]["n"] == 8
