"""Generation (SFT): the loss is cross-entropy over the completion tokens only, batched left-padded
KV-cached greedy decoding equals a one-sequence, no-cache greedy loop, answers are extracted and
matched as documented, the chat template is used when asked, a tiny model learns to answer, bad input
stops with one line naming the key, and the real model runs end to end."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftlab.config import TaskConfig, compose, validate
from peftlab.errors import ConfigError
from peftlab.tasks import build_task
from peftlab.tasks.data import load_splits
from peftlab.tasks.generation import GenerationTask, answer_rule, cut_at, match, numbers_in

CAUSAL = SimpleNamespace(kind="causal", name="tiny-llama", max_positions=None)
RECORDS = [
    {"text": "12 + 7 =", "completion": " 19"},
    {"text": "Tom has three apples and gets 14 more. How many apples does he have?", "completion": "17 apples"},
    {"text": "Say yes", "completion": " yes"},
]


def tiny_causal(vocab: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides)
    return LlamaForCausalLM(config).eval()


def make_task(tokenizer, records=RECORDS, arch=CAUSAL, **values) -> GenerationTask:
    cfg = TaskConfig(name="gen", type="generation", source="asdiv", metric=values.pop("metric", "exact_match"),
                     max_length=values.pop("max_length", 128), **values)
    return build_task(cfg, tokenizer, arch, splits={"train": records, "validation": records, "test": records}, facts={})


def test_loss_is_cross_entropy_over_the_completion_tokens_only(smollm2_tokenizer):
    task = make_task(smollm2_tokenizer)
    model = tiny_causal(len(smollm2_tokenizer)).double()
    examples = task.encoded["train"]
    batch = task.collate(examples)
    with torch.no_grad():
        loss = task.loss(model, batch)
        total, count = torch.zeros((), dtype=torch.float64), 0
        for prompt, completion, _ in examples:  # one unpadded sequence at a time, by hand
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0]
            predicting = logits[len(prompt) - 1:len(prompt) + len(completion) - 1]  # positions that predict the completion
            total += F.cross_entropy(predicting, torch.tensor(completion), reduction="sum")
            count += len(completion)
    assert task.loss_units(batch) == count == sum(len(c) for _, c, _ in examples)
    assert torch.allclose(loss.double(), total / count, rtol=1e-6, atol=0)  # the task computes CE in float32
    # every completion ends with eos, and no prompt token (or pad) carries a label
    assert all(c[-1] == smollm2_tokenizer.eos_token_id for _, c, _ in examples)
    labelled = (batch["labels"] != -100).sum(1).tolist()
    assert labelled == [len(c) for _, c, _ in examples]


def greedy_without_cache(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """The reference: argmax of a full forward over the whole sequence, one token at a time."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt):]


def test_batched_left_padded_generation_equals_one_sequence_greedy(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    task = make_task(tokenizer, chat_template=False, max_new_tokens=8)
    model = tiny_causal(len(tokenizer), seed=3).double()
    examples = task.encoded["test"]
    assert len({len(p) for p, _, _ in examples}) == len(examples)  # different lengths: the batch is padded
    batch = task.collate(examples)
    assert (batch["prompt_mask"][:, -1] == 1).all() and (batch["prompt_mask"][:, 0] == 0).any()  # LEFT padding
    with torch.no_grad():
        batched = task.generate(model, batch["prompt_ids"], batch["prompt_mask"])
        single = [task.generate(model, *(lambda b: (b["prompt_ids"], b["prompt_mask"]))(task.collate([e])))[0]
                  for e in examples]
    reference = [tokenizer.decode(greedy_without_cache(model, p, 8, tokenizer.eos_token_id), skip_special_tokens=True).strip()
                 for p, _, _ in examples]
    assert batched == single == reference
    assert any(reference)  # the random model does say something


def test_numbers_and_the_stop_string():
    assert [numbers_in(t) for t in ("1,250 and 3.5", "3:30 p.m.", "6th x2 5/2", "-4.", "(12)")] == \
        [["1250", "3.5"], [], [], ["-4"], ["12"]]
    assert cut_at(" 792\n123 + 4 = 127", "\n") == "792" and cut_at(" 792 ", None) == "792"


@pytest.mark.parametrize("rule,generated,reference,expected", [
    ("last_number", "There are 9 apples.", "9 apples", (1, 1)),
    ("last_number", "9.0", "9 apples", (0, 1)),            # numbers as numbers
    ("last_number", "He had 3, then 12 more: 15", "15 balls", (1, 1)),
    ("last_number", "1,000 dollars", "1000", (1, 1)),
    ("last_number", "I do not know", "9 apples", (0, 0)),  # no answer found: wrong
    ("last_number", "8 apples", "9 apples", (0, 0)),
    ("text", " 792", " 792", (1, 1)),
    ("text", "792.", "792", (1, 1)),                      # surrounding punctuation and case are normalised
    ("text", "The Answer", "the answer", (1, 1)),
    ("text", "792 + 1", "792", (0, 0)),
    ("text", "9.50", "9.5", (0, 1)),
    ("regex:answer is (\\w+)", "so the answer is Paris.", "Paris", (1, 1)),
    ("regex:answer is (\\w+)", "Paris", "Paris", (0, 0)),   # the rule finds nothing in the generated text
    ("regex:\\d+", "x 42 y 7", "42", (1, 1)),             # no group: the first whole match
])
def test_answer_extraction_and_matching(rule, generated, reference, expected):
    assert match(generated, reference, answer_rule(rule)) == expected


def test_chat_template_on_and_off(smollm2_tokenizer, monkeypatch):
    tokenizer = smollm2_tokenizer
    record = [{"text": "What is 2 + 2?", "completion": "4"}]
    for switch in ("auto", True):
        task = make_task(tokenizer, records=record, chat_template=switch)
        prompt, completion, _ = task.encoded["train"][0]
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                                 add_generation_prompt=True)
        assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(prompt).endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
        assert completion == tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert task.facts["chat_template"] is True
    task = make_task(tokenizer, records=record, chat_template=False)
    assert task.encoded["train"][0][0] == tokenizer("What is 2 + 2?")["input_ids"]
    monkeypatch.setattr(tokenizer, "chat_template", None)
    assert make_task(tokenizer, records=record).facts["chat_template"] is False  # auto: none to use
    with pytest.raises(ConfigError) as err:
        make_task(tokenizer, records=record, chat_template=True)
    assert err.value.key == "task.chat_template"


def test_a_tiny_model_learns_to_answer(smollm2_tokenizer):
    """Trained on the completion loss alone, greedy generation reproduces the completions (and not before)."""
    torch.manual_seed(0)
    task = make_task(smollm2_tokenizer, chat_template=False, max_new_tokens=8, stop="\n", answer="text")
    model = tiny_causal(len(smollm2_tokenizer)).train()
    batch = task.collate(task.encoded["train"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = task.evaluate_batches(model.eval(), iter([batch]))
    model.train()
    for _ in range(60):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate_batches(model.eval(), iter([batch]))
    assert before["exact_match"] == 0 and after["exact_match"] == 1.0, after["samples"]
    assert after["loss"] < 0.05 < before["loss"]
    assert after["predictions"] == [1, 1, 1] and after["references"] == [1, 1, 1]
    assert [s["generated"] for s in after["samples"]] == ["19", "17 apples", "yes"]


@pytest.mark.parametrize("values,key", [
    ({"answer": "first_word"}, "task.answer"),
    ({"answer": "regex:("}, "task.answer"),
    ({"metric": "accuracy"}, "task.metric"),
    ({"chat_template": "sometimes"}, "task.chat_template"),
    ({"max_new_tokens": 0}, "task.max_new_tokens"),
    ({"stop": ""}, "task.stop"),
    ({"prompt": "{passage}: {text}"}, "task.prompt"),
])
def test_bad_values_name_their_key(smollm2_tokenizer, values, key):
    with pytest.raises(ConfigError) as err:
        make_task(smollm2_tokenizer, **values)
    assert err.value.key == key


def test_records_without_a_completion_and_encoder_models_stop(smollm2_tokenizer, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_task(smollm2_tokenizer, records=[{"text": "a passage of Hamlet"}])
    assert err.value.key == "task.source" and "completion" in str(err.value)
    path = tmp_path / "qa.jsonl"  # a file of questions and answers without the completion column the task names
    path.write_text("".join(json.dumps({"text": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(10)))
    cfg = validate(compose(["task=asdiv", "task.source=jsonl", f"+task.path={path}", "task.validation_size=2",
                            "task.test_size=2", "model=smollm2-135m"])).task
    with pytest.raises(ConfigError) as err:
        load_splits(cfg)
    assert err.value.key == "task.completion_column" and "answer" in err.value.message  # it lists the columns
    named = validate(compose(["task=asdiv", "task.source=jsonl", f"+task.path={path}", "task.validation_size=2",
                              "task.test_size=2", "model=smollm2-135m", "+task.completion_column=answer",
                              "task.prompt='{text}'"])).task
    splits, facts = load_splits(named)
    assert build_task(named, smollm2_tokenizer, CAUSAL, splits, facts).splits["test"][0]["completion"]
    encoder = SimpleNamespace(kind="encoder", name="minilm", max_positions=512)
    with pytest.raises(ConfigError) as err:
        make_task(smollm2_tokenizer, arch=encoder)
    assert err.value.key == "task.type"
    with pytest.raises(ConfigError) as err:  # the config path: unknown types stop in validate
        validate(compose(["task=asdiv", "task.type=generate"]))
    assert err.value.key == "task.type"


def test_shipped_sources():
    splits, facts = load_splits(validate(compose(["task=asdiv", "model=smollm2-135m"])).task)
    assert facts["raw_examples"] == 2085 and facts["duplicates_removed"] == 1
    assert facts["sizes"] == {"test": 500, "validation": 200, "train": 1384}
    records = [r for s in splits.values() for r in s]
    assert all(len(numbers_in(r["completion"])) == 1 for r in records)
    assert records[0]["text"] == f"{records[0]['fields']['passage']} {records[0]['fields']['question']}"
    gen, _ = load_splits(validate(compose(["task=arithmetic_gen"])).task)
    lm, _ = load_splits(validate(compose(["task=arithmetic"])).task)
    for name in ("train", "validation", "test"):  # the same sums in the same splits as task=arithmetic
        assert [f"{r['text']}{r['completion']}" for r in gen[name]] == [r["text"] for r in lm[name]]


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [("arithmetic_gen", ["task.max_new_tokens=4"]),
                                        ("asdiv", ["task.max_new_tokens=4", "trainer.eval_before=false"])])
def test_trains_end_to_end_on_smollm2(tmp_path, task, extra):
    """Two LoRA steps and a tiny evaluation (the machine is shared: kept short)."""
    from peftlab.training.trainer import run

    cfg = compose(["model=smollm2-135m", f"task={task}", "method=lora", "trainer.max_steps=2", "trainer.batch_size=2",
                   "task.max_eval_examples=4", "trainer.eval_batch_size=4", "task.max_train_examples=8",
                   "task.probes=[]", "trainer.progress=false", "trainer.checkpoint_every=0", *extra])
    result = run(cfg, tmp_path)
    assert result["status"] == "ok", result["reason"]
    for when in ("before", "after") if task == "arithmetic_gen" else ("after",):
        test = result["metrics"][when]["test"]
        assert test["n"] == 4 and 0 <= test["exact_match"] <= test["numeric_match"] <= 1 and test["loss"] > 0
        assert len(test["samples"]) == 4 and all(set(s) == {"prompt", "generated", "reference"} for s in test["samples"])
    assert result["task"]["metric"] == ("exact_match" if task == "arithmetic_gen" else "numeric_match")
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions["after"]["test"]) == len(predictions["references"]["test"]) == 4
    assert set(predictions["after"]["test"]) <= {0, 1}


@pytest.mark.parametrize("name", sorted(__import__("peftlab.methods", fromlist=["METHODS"]).METHODS))
def test_every_method_generates_as_its_full_sequence_forward(smollm2_tokenizer, name):
    """Each method applied (its trainable values moved off their init, so the adapter matters): batched,
    left-padded, KV-cached generation equals the no-cache greedy loop over the full sequence, which is
    the forward training uses. Prefix tuning puts its prefix in the cache on the first step; prompt
    tuning prepends its embeddings on the first step only."""
    from peftlab.methods import method_class

    cls = method_class(name)
    small = {"r": 8} if hasattr(cls.config_class, "r") and cls.config_class().r > 32 else {}  # the tiny model is 32 wide
    method = cls(cls.config_class(**small))
    biases = {"attention_bias": True, "mlp_bias": True} if name == "bitfit" else {}  # smollm2 has none: bitfit refuses it
    model = tiny_causal(len(smollm2_tokenizer), seed=5, **biases)
    if name == "qlora":
        pytest.importorskip("bitsandbytes")
    method.apply(model, CAUSAL)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    task = make_task(smollm2_tokenizer, chat_template=False, max_new_tokens=6)
    examples = task.encoded["test"]
    batch = task.collate(examples)
    with torch.no_grad():
        batched = task.generate(model, batch["prompt_ids"], batch["prompt_mask"])
        reference = [smollm2_tokenizer.decode(greedy_without_cache(model, p, 6, smollm2_tokenizer.eos_token_id),
                                              skip_special_tokens=True).strip() for p, _, _ in examples]
    assert batched == reference
