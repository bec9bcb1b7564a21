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


def test_boolq_trains_on_train_and_tests_on_dev_without_a_leak():
    from peftlab.config import compose, validate
    from peftlab.tasks.data import example_key

    cfg = validate(compose(["task=boolq"])).task
    splits, facts = load_splits(cfg)
    assert facts["sizes"] == {"train": 9427 - 500, "validation": 500, "test": 3270}
    assert facts["given_splits"] == ["test", "train"] and facts["duplicates_removed"] == 0
    keys = {name: {example_key(r) for r in records} for name, records in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    # the dev rows carry their title, as combined.jsonl writes them
    assert all(" -- " in r["pair"] for r in splits["test"][:50])
    assert {r["label"] for r in splits["test"]} == {0, 1}
    assert sum(r["label"] for r in splits["test"]) == 2033  # dev: 2,033 True, 1,237 False


def test_text_pairs_from_a_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    rows = [(f"premise {i}", f"hypothesis {i}", "entailment" if i % 2 else "contradiction") for i in range(10)]
    path.write_text("premise,hypothesis,label\n" + "\n".join(",".join(r) for r in rows) + "\n")
    cfg = csv_task(path, text_column=["premise", "hypothesis"])
    splits, _ = load_splits(cfg)
    record = next(r for s in splits.values() for r in s if r["text"] == "premise 3")
    assert record["pair"] == "hypothesis 3" and record["fields"] == {"premise": "premise 3", "hypothesis": "hypothesis 3"}
    with pytest.raises(ConfigError) as err:
        load_splits(csv_task(path, text_column=["premise", "nope"]))
    assert err.value.key == "task.text_column[1]"
    with pytest.raises(ConfigError) as err:
        load_splits(csv_task(path, text_column=["premise", "hypothesis", "label"]))
    assert err.value.key == "task.text_column"


PAIR = {"text": "is the sky blue", "pair": "The sky " + "is very blue indeed " * 60,
        "fields": {"question": "is the sky blue", "passage": "The sky " + "is very blue indeed " * 60}, "label": 1}


def pair_task(tokenizer, kind, **overrides):
    from peftlab.tasks.classification import ClassificationTask

    cfg = TaskConfig(name="pairs", type="classification", labels=["False", "True"], verbalizer=[" no", " yes"],
                     prompt=overrides.pop("prompt", "{passage}\nQuestion: {question}?\nAnswer:"), max_length=48)
    other = {**PAIR, "label": 0, "text": "is grass red"}
    return ClassificationTask(cfg, tokenizer, SimpleNamespace(kind=kind), {"train": [PAIR, other], "test": [PAIR]}, {})


def test_encoder_pairs_cut_the_longer_side(minilm_tokenizer):
    task = pair_task(minilm_tokenizer, "encoder")
    ids, types, label = task.encoded["test"][0]
    assert len(ids) == 48 and ids.count(minilm_tokenizer.sep_token_id) == 2 and label == 1
    question = minilm_tokenizer("is the sky blue", add_special_tokens=False)["input_ids"]
    assert ids[1:1 + len(question)] == question  # the question is whole; the passage was cut
    assert types[:len(question) + 2] == [0] * (len(question) + 2) and types[-1] == 1


def test_causal_pairs_fill_the_prompt_and_cut_the_passage(smollm2_tokenizer):
    task = pair_task(smollm2_tokenizer, "causal")
    ids, position, label = task.encoded["test"][0]
    assert len(ids) == 48 and ids[-1] == task.label_tokens[1] and position == len(ids) - 2
    tail = smollm2_tokenizer("\nQuestion: is the sky blue?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert ids[position + 1 - len(tail):position + 1] == tail  # the question survives, the passage is cut
    with pytest.raises(ConfigError) as err:
        pair_task(smollm2_tokenizer, "causal", prompt="{context}: {question}")
    assert err.value.key == "task.prompt"


def test_a_generation_file_names_its_completion_column(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"{i} + 1 =", "answer": f" {i + 1}"}) for i in range(12)) + "\n")
    cfg = TaskConfig(name="qa", type="generation", source="jsonl", path=str(path), text_column="question",
                     completion_column="answer", validation_size=2, test_size=2)
    splits, _ = load_splits(cfg)
    record = next(r for s in splits.values() for r in s if r["text"] == "3 + 1 =")
    assert record["completion"] == " 4"
    with pytest.raises(ConfigError) as err:
        load_splits(TaskConfig(name="qa", type="generation", source="jsonl", path=str(path), text_column="question",
                               validation_size=2, test_size=2))
    assert err.value.key == "task.completion_column"
