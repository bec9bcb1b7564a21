"""Files a researcher brings: TSV and other delimiters, encodings, JSONL errors that name the line,
empty texts dropped and counted, classes the head is sized by, and data that cannot train."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.tasks import build_task, head_outputs
from peftlab.tasks.data import load_splits

ROWS = [("a fine film", "fresh"), ("dull and long", "rotten"), ("great fun", "fresh"), ("awful", "rotten"),
        ("lovely", "fresh"), ("boring", "rotten"), ("superb", "fresh"), ("weak plot", "rotten")]


def csv_task(path, **overrides) -> TaskConfig:
    return TaskConfig(name="mine", type="classification", source=overrides.pop("source", "csv"), path=str(path),
                      validation_size=2, test_size=2, **overrides)


def test_tsv_by_suffix_and_a_delimiter_key(tmp_path):
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("text\tlabel\n" + "\n".join(f"{t}, really\t{y}" for t, y in ROWS) + "\n")
    splits, _ = load_splits(csv_task(tsv))
    assert sorted(r["text"] for s in splits.values() for r in s) == sorted(f"{t}, really" for t, _ in ROWS)
    semicolons = tmp_path / "reviews.csv"
    semicolons.write_text("text;label\n" + "\n".join(f"{t};{y}" for t, y in ROWS) + "\n")
    splits, _ = load_splits(csv_task(semicolons, delimiter=";"))
    assert {r["label"] for s in splits.values() for r in s} == {0, 1}
    with pytest.raises(ConfigError) as err:  # read with the default comma: one column
        load_splits(csv_task(semicolons))
    assert err.value.key == "task.text_column"


def test_encoding_key(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(("text,label\n" + "\n".join(f"{t} café,{y}" for t, y in ROWS) + "\n").encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_splits(csv_task(path))
    assert err.value.key == "task.path" and "utf-8" in err.value.message
    splits, _ = load_splits(csv_task(path, encoding="latin-1"))
    assert all(r["text"].endswith("café") for s in splits.values() for r in s)
    with pytest.raises(ConfigError) as err:
        load_splits(csv_task(path, encoding="klingon"))
    assert err.value.key == "task.encoding"


def test_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "reviews.jsonl"
    lines = [json.dumps({"text": t, "label": y}) for t, y in ROWS]
    lines.insert(6, '{"text": "broken", "label": ')  # line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_splits(csv_task(path, source="jsonl"))
    assert err.value.key == "task.path" and f"{path}:7 " in err.value.message


def test_empty_texts_are_dropped_and_counted(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in ROWS) + "\n,fresh\n   ,rotten\ngreat fun,fresh\n")
    splits, facts = load_splits(csv_task(path))
    assert facts["empty_removed"] == 2 and facts["duplicates_removed"] == 1
    assert sum(facts["sizes"].values()) == len(ROWS)
    assert all(r["text"].strip() for s in splits.values() for r in s)


def test_one_class_in_training_cannot_train(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "\n".join(f"review {i},fresh" for i in range(10)) + "\n")
    cfg = csv_task(path, labels=["rotten", "fresh"])
    splits, facts = load_splits(cfg)
    with pytest.raises(ConfigError) as err:
        build_task(cfg, None, SimpleNamespace(kind="encoder", max_positions=512), splits, facts)
    assert err.value.key == "task.label_column" and "one class" in err.value.message


def test_head_is_sized_by_the_declared_labels_and_every_split():
    records = {"train": [{"label": 0}, {"label": 1}], "validation": [{"label": 2}], "test": [{"label": 1}]}
    assert head_outputs(TaskConfig(type="classification"), records) == 3  # a class seen only in validation
    assert head_outputs(TaskConfig(type="classification", labels=list("abcdefgh")), records) == 8


def test_max_length_beyond_the_position_table_stops_before_training():
    cfg = TaskConfig(name="mine", max_length=1024)
    with pytest.raises(ConfigError) as err:
        build_task(cfg, None, SimpleNamespace(kind="encoder", max_positions=512))
    assert err.value.key == "task.max_length" and "512" in err.value.message
