"""Forgetting probes: values against independent computations, sign convention, selection rules."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_bert, tiny_llama
from peftlab.config import TaskConfig
from peftlab.errors import ConfigError
from peftlab.models.loading import Arch
from peftlab.tasks.probes import (
    MAX_PAIRS,
    MAX_TEXTS,
    MAX_TOKENS,
    PROBES,
    LMProbe,
    RetrievalProbe,
    build_probes,
    evaluate_probes,
    forgetting_report,
)

CPU = torch.device("cpu")
CAUSAL = Arch(name="tiny-llama", family="llama", kind="causal", path="-")
ENCODER = Arch(name="tiny-bert", family="bert", kind="encoder", path="-")
SENTIMENT = TaskConfig(name="sentiment", source="rotten_tomatoes")


class CharTokenizer:
    """Offline stand-in for a tokenizer: one id per character, mod the tiny models' vocab (128)."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = False, max_length: int | None = None, **_):
        ids = [1 + ord(c) % 127 for c in text]  # 1..127: 0 stays the pad id
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


def test_lm_probe_equals_per_text_cross_entropy(tokenizer):
    (probe,) = build_probes(["english"], tokenizer, CAUSAL, SENTIMENT)
    assert isinstance(probe, LMProbe) and len(probe) == MAX_TEXTS
    assert all(2 <= len(t) <= MAX_TOKENS for t in probe.texts)
    model = tiny_llama()
    value = evaluate_probes(model, [probe], CPU, contextlib.nullcontext, batch_size=5)["english"]  # ragged batches
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in probe.texts:  # one unpadded text at a time
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1]  # (T-1, V)
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    assert value == pytest.approx(total / count, rel=1e-5)


def test_retrieval_probe_equals_mean_pooled_cosine_recall(tokenizer):
    (probe,) = build_probes(["retrieval"], tokenizer, ENCODER, SENTIMENT)
    assert isinstance(probe, RetrievalProbe) and len(probe) == MAX_PAIRS
    model = tiny_bert()

    def embed(encoded):
        rows = []
        with torch.no_grad():
            for e in encoded:
                hidden = model.bert(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0]  # (T, d)
                rows.append(hidden.mean(0))
        return torch.stack(rows)

    q, a = embed(probe.questions), embed(probe.answers)
    similarity = F.cosine_similarity(q[:, None], a[None], dim=-1)  # (N, N)
    expected = (similarity.argmax(1) == torch.arange(len(q))).float().mean().item()
    value = evaluate_probes(model, [probe], CPU, contextlib.nullcontext, batch_size=7)["retrieval"]
    assert value == pytest.approx(expected)


def test_selection_is_deterministic_and_texts_differ_between_probes(tokenizer):
    first = build_probes(["english", "code"], tokenizer, CAUSAL, SENTIMENT)
    second = build_probes(["english", "code"], tokenizer, CAUSAL, SENTIMENT)
    assert [p.texts for p in first] == [p.texts for p in second]
    assert first[0].texts != first[1].texts


def test_probe_texts_are_no_longer_than_the_tasks_examples(tokenizer):
    short_task = TaskConfig(name="sentiment", source="rotten_tomatoes", max_length=16)
    lm, retrieval = (build_probes([name], tokenizer, arch, short_task)[0] for name, arch in
                     (("code", CAUSAL), ("retrieval", ENCODER)))
    assert max(map(len, lm.texts)) == 16
    assert max(len(e["input_ids"]) for e in retrieval.questions + retrieval.answers) == 16


def test_forgetting_sign_convention():
    loss_probe = LMProbe("english", [[1, 2]], pad_id=0)
    recall_probe = RetrievalProbe("retrieval", [], [], pad_id=0)
    report = forgetting_report([loss_probe, recall_probe],
                               before={"english": 2.0, "retrieval": 0.75}, after={"english": 2.5, "retrieval": 0.5})
    assert report["probes"]["english"] == {"before": 2.0, "after": 2.5, "forgetting": 0.5,
                                           "metric": "loss", "higher_is_better": False}
    assert report["probes"]["retrieval"]["forgetting"] == pytest.approx(0.25)  # recall fell: forgotten
    assert report["probes"]["retrieval"]["higher_is_better"] is True
    # each family is averaged on its own (a loss and a recall have no common unit); the headline
    # mean is the LM-loss family's when there is one
    assert report["means"] == pytest.approx({"loss": 0.5, "recall@1": 0.25})
    assert report["mean"] == pytest.approx(0.5)
    only_recall = forgetting_report([recall_probe], before={"retrieval": 0.75}, after={"retrieval": 0.5})
    assert only_recall["mean"] == pytest.approx(0.25)
    improved = forgetting_report([loss_probe], before={"english": 2.0}, after={"english": 1.5})
    assert improved["mean"] == pytest.approx(-0.5)  # lower loss after: negative forgetting
    assert forgetting_report([loss_probe], before={}, after={}) == {"probes": {}, "means": {}, "mean": None}


def test_unknown_probe_name_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError) as err:
        build_probes(["english", "klingon"], tokenizer, CAUSAL, SENTIMENT)
    assert err.value.key == "task.probes"
    assert "'klingon'" in str(err.value) and all(name in str(err.value) for name in PROBES)
    assert "\n" not in str(err.value)


def test_probes_for_the_other_model_kind_are_skipped(tokenizer):
    every = ["english", "code", "chat", "retrieval"]
    assert [p.name for p in build_probes(every, tokenizer, CAUSAL, SENTIMENT)] == ["english", "code", "chat"]
    assert [p.name for p in build_probes(every, tokenizer, ENCODER, SENTIMENT)] == ["retrieval"]
    assert build_probes([], tokenizer, CAUSAL, SENTIMENT) == []


def test_probe_on_the_tasks_own_data_is_skipped(tokenizer):
    chat_task = TaskConfig(name="lm", type="lm", source="chatterbot")
    assert [p.name for p in build_probes(["english", "chat"], tokenizer, CAUSAL, chat_task)] == ["english"]
    assert build_probes(["retrieval"], tokenizer, ENCODER, chat_task) == []


def test_perturbed_weights_show_positive_forgetting(tokenizer):
    probes = build_probes(["english", "code"], tokenizer, CAUSAL, SENTIMENT)
    model = tiny_llama().train()
    before = evaluate_probes(model, probes, CPU, contextlib.nullcontext, batch_size=16)
    assert model.training  # mode restored
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 2.0)  # heavy damage: sharp, wrong logits
    report = forgetting_report(probes, before, evaluate_probes(model, probes, CPU, contextlib.nullcontext, 16))
    assert all(row["forgetting"] > 0.5 for row in report["probes"].values()), report
    assert report["mean"] > 0.5


def test_evaluate_probes_runs_inside_autocast_in_eval_mode(tokenizer):
    probes = build_probes(["code"], tokenizer, CAUSAL, SENTIMENT)
    model = tiny_llama().train()
    seen = []

    @contextlib.contextmanager
    def autocast():
        seen.append(model.training)
        yield

    evaluate_probes(model, probes, CPU, autocast, batch_size=32)
    assert seen == [False] and model.training


def test_multiple_choice_probes_score_fixed_questions_like_the_task(smollm2_tokenizer):
    """acc_norm over MAX_CHOICES fixed questions of each set, with its task's prompt; skipped for
    encoders and for a task that trains on that set."""
    from peftlab.tasks.probes import MAX_CHOICES, MultipleChoiceProbe

    names = ["piqa", "openbookqa", "commonsenseqa", "siqa"]
    probes = build_probes(["english", *names], smollm2_tokenizer, CAUSAL, SENTIMENT)
    assert [p.name for p in probes] == ["english", *names]
    assert all(len(p) == MAX_CHOICES and p.metric == "acc_norm" and p.higher_is_better for p in probes[1:])
    again = build_probes(names, smollm2_tokenizer, CAUSAL, SENTIMENT)
    assert [p.task.splits["probe"] for p in again] == [p.task.splits["probe"] for p in probes[1:]]  # fixed
    assert probes[4].task.cfg.prompt == "Q: {passage} {text}\nA:"  # the set's own prompt
    assert build_probes(names, smollm2_tokenizer, ENCODER, SENTIMENT) == []
    piqa_task = TaskConfig(name="piqa", type="multiple_choice", source="piqa")
    assert [p.name for p in build_probes(names, smollm2_tokenizer, CAUSAL, piqa_task)] == names[1:]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    probe = probes[2]
    assert isinstance(probe, MultipleChoiceProbe)
    value = evaluate_probes(model, [probe], CPU, contextlib.nullcontext, 16)["openbookqa"]
    expected = probe.task.evaluate_batches(model.eval(), iter([probe.task.collate(probe.task.encoded["probe"])]))
    assert value == pytest.approx(expected["acc_norm"]) and 0 <= value <= 1

