"""source=hf: a dataset saved with datasets' save_to_disk (or data files) loads by path, offline, with
its own splits as given (split_map renames; unlabeled rows dropped; a missing split taken from
train), class names from its ClassLabel; the GLUE / SuperGLUE task YAMLs read a local dataset of
their schema; a path that does not exist says how it would be fetched."""
from __future__ import annotations

import pytest

from peftlab.config import compose, validate
from peftlab.errors import ConfigError
from peftlab.tasks.data import example_key, load_splits



def glue_like(tmp_path, pairs=True, regression=False):
    import datasets

    def rows(n, start, labeled=True):
        out = {"sentence1": [f"first sentence {start + i}" for i in range(n)], "idx": list(range(n))}
        if pairs:
            out["sentence2"] = [f"second sentence {start + i}" for i in range(n)]
        out["label"] = [float(i % 5) for i in range(n)] if regression else [(i % 2) if labeled else -1 for i in range(n)]
        return out

    label = datasets.Value("float32") if regression else datasets.ClassLabel(names=["not_equivalent", "equivalent"])
    features = datasets.Features({"sentence1": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  **({"sentence2": datasets.Value("string")} if pairs else {}), "label": label})
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(60, 0), features=features),
        "validation": datasets.Dataset.from_dict(rows(20, 1000), features=features),
        "test": datasets.Dataset.from_dict(rows(30, 2000, labeled=regression), features=features),
    })
    data.save_to_disk(str(tmp_path / "glue_like"))
    return tmp_path / "glue_like"


def test_glue_task_yaml_reads_a_local_copy(tmp_path):
    path = glue_like(tmp_path)
    cfg = validate(compose(["task=glue_mrpc", f"task.path={path}", "task.validation_size=10"])).task
    splits, facts = load_splits(cfg)
    assert facts["sizes"] == {"train": 50, "validation": 10, "test": 20}  # test = the dataset's validation
    assert facts["given_splits"] == ["test", "train"]  # the unlabeled test split is dropped (label -1)
    assert all(r["text"].startswith("first sentence 1") and "pair" in r for r in splits["test"])
    assert {r["label"] for r in splits["train"]} == {0, 1}  # ClassLabel names in cfg.labels' order
    keys = {name: {example_key(r) for r in records} for name, records in splits.items()}
    assert not keys["train"] & keys["validation"]


def test_stsb_regression_and_a_data_file(tmp_path):
    path = glue_like(tmp_path, regression=True)
    cfg = validate(compose(["task=glue_stsb", f"task.path={path}", "task.validation_size=10"])).task
    splits, facts = load_splits(cfg)
    assert facts["sizes"]["test"] == 20 and all(isinstance(r["label"], float) for r in splits["test"])
    import datasets

    datasets.load_from_disk(str(path))["train"].to_json(str(tmp_path / "train.jsonl"))
    from dataclasses import replace

    one = replace(validate(compose(["task=glue_stsb", f"task.path={tmp_path / 'train.jsonl'}", "task.validation_size=10",
                                    "task.test_size=10"])).task, split_map={})
    splits, facts = load_splits(one)  # a single file: its one split is train, the rest is split off it
    assert facts["sizes"] == {"train": 40, "validation": 10, "test": 10}


def test_every_glue_yaml_composes_and_names_a_real_metric():
    from peftlab.paths import CONF_DIR

    names = sorted(p.stem for p in (CONF_DIR / "task").glob("*glue*.yaml"))
    assert len(names) == 9
    for name in names:
        cfg = validate(compose([f"task={name}"])).task
        assert cfg.source == "hf" and cfg.split_map and cfg.metric in ("accuracy", "f1_positive", "matthews", "pearson")


def test_a_missing_dataset_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = validate(compose(["task=glue_rte", f"task.path={tmp_path / 'nowhere'}"])).task
    with pytest.raises(ConfigError) as err:
        load_splits(cfg)
    assert err.value.key == "task.path" and "HF_HUB_OFFLINE=0" in err.value.message
    bad_map = validate(compose(["task=glue_rte", f"task.path={glue_like(tmp_path)}", "task.split_map={test: dev}"])).task
    with pytest.raises(ConfigError) as err:
        load_splits(bad_map)
    assert err.value.key == "task.split_map"
