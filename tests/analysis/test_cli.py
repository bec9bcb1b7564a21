"""peftlab.analysis.cli: `peftlab analyze` end to end, on an adapter trained and saved by HF peft itself
and on peftlab runs; bad input gives one clear line and status 2."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis_support import _seed, rel_err  # noqa: F401  (_seed: a fixture)
from peftlab.analysis import amplification
from peftlab.analysis.cli import analyze_main

pytestmark = pytest.mark.usefixtures("_seed")  # every test sees the same random matrices


# --------------------------------------------------------------------------- #
# `peftlab analyze` on adapters saved by HF peft
# --------------------------------------------------------------------------- #
def tiny_llama64(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def save_peft_adapter(path, seed: int = 0, **lora_kwargs):
    """A peft LoRA adapter with random (non-zero) B, one optimizer step taken, saved by peft."""
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = get_peft_model(tiny_llama64(seed), LoraConfig(**{**options, **lora_kwargs}))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(str(path))
    return model


def peft_deltas(model) -> dict[str, tuple[float, np.ndarray]]:
    """Module name -> (scale, fp64 scale·B@A), read from peft's in-memory layers, independently of the file."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            b = module.lora_B["default"].weight.detach().double().numpy()
            a = module.lora_A["default"].weight.detach().double().numpy()
            scale = module.scaling["default"]
            deltas[name.removeprefix("base_model.model.")] = (scale, scale * b @ a)
    return deltas


@pytest.mark.parametrize("lora_kwargs, scales", [
    ({}, {"q_proj": 2.0, "v_proj": 2.0}),
    ({"use_rslora": True}, {"q_proj": 4.0, "v_proj": 4.0}),
    ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}}, {"q_proj": 4.0, "v_proj": 4.0}),
])
def test_analyze_peft_adapter_gives_sigma_of_independent_svd(tmp_path, lora_kwargs, scales):
    model = save_peft_adapter(tmp_path / "adapter", **lora_kwargs)
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(out), "--no-plots"]) == 0

    spectra = pd.read_csv(out / "spectra.csv")
    deltas = peft_deltas(model)
    assert set(spectra["module"]) == set(deltas) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for module, (scale, delta) in deltas.items():
        assert scale == scales[module.rsplit(".", 1)[-1]]
        rows = spectra[spectra["module"] == module].sort_values("index")
        expected = np.linalg.svd(delta, compute_uv=False)[: len(rows)]
        assert len(rows) == (2 if "v_proj" in module and lora_kwargs.get("rank_pattern") else 4)
        assert rel_err(rows["sigma"], expected) < 1e-6, module
    ranks = pd.read_csv(out / "ranks.csv")
    assert set(ranks["spectrum"]) == {"factored"}
    assert set(ranks["method"]) == {"rslora" if lora_kwargs.get("use_rslora") else "lora"}


def test_analyze_peft_adapter_with_base_writes_amplification(tmp_path, monkeypatch, capsys):
    model = save_peft_adapter(tmp_path / "adapter")
    base = tiny_llama64(0)  # the same base weights the adapter was trained on
    fake_models = types.ModuleType("peftlab.models.loading")
    fake_models.load_base = lambda name: (base, None)
    monkeypatch.setitem(sys.modules, "peftlab.models.loading", fake_models)

    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--base", "tiny", "--out", str(out)]) == 0
    table = pd.read_csv(out / "amplification.csv")
    assert len(table) == 4
    for module, (_, delta) in peft_deltas(model).items():
        w0 = base.get_submodule(module).weight.detach().double()
        expected = amplification(torch.from_numpy(delta), w0, r=4)
        row = table[table["module"] == module].iloc[0]
        assert row["proj_delta"] == pytest.approx(expected["proj_delta"], rel=1e-6)
        assert row["amplification"] == pytest.approx(expected["amplification"], rel=1e-6)
    assert (out / "spectra_adapter.png").stat().st_size > 0

    assert analyze_main([str(tmp_path / "adapter"), "--out", str(tmp_path / "out2")]) == 0
    assert "amplification skipped" in capsys.readouterr().out


def test_compare_two_peft_adapters(tmp_path):
    save_peft_adapter(tmp_path / "seed0", seed=0)
    save_peft_adapter(tmp_path / "seed1", seed=1, r=8)
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "seed0"), "--compare", str(tmp_path / "seed1"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "similarity_seed0_vs_seed1.csv")
    assert len(table) == 4 * (4 * 8) and table["phi"].between(0, 1 + 1e-9).all()
    assert (out / "similarity_seed0_vs_seed1_mean.png").stat().st_size > 0

    assert analyze_main([str(tmp_path / "seed0"), "--compare", str(tmp_path / "seed0"), "--out", str(out)]) == 0
    self_table = pd.read_csv(out / "similarity_seed0_vs_seed0.csv")
    np.testing.assert_allclose(self_table["phi"], 1.0, atol=1e-9)

# --------------------------------------------------------------------------- #
# peftlab runs (load_run stubbed: it belongs to peftlab.reporting.runs)
# --------------------------------------------------------------------------- #
def fake_runs_module(monkeypatch, load_run):
    module = types.ModuleType("peftlab.reporting.runs")
    module.load_run = load_run
    monkeypatch.setitem(sys.modules, "peftlab.reporting.runs", module)


def make_run_dir(tmp_path, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "ok"}))
    return run


def test_analyze_peftlab_run_with_lora_layers(tmp_path, monkeypatch):
    from peftlab.methods.lora import LoRA, LoRAConfig

    torch.manual_seed(0)
    model = tiny_llama64()
    method = LoRA(LoRAConfig(r=4, alpha=8.0, targets=["q", "v"]))
    method.apply(model)
    for layer in method.layers(model).values():
        nn.init.normal_(layer.lora_B)
    fake_runs_module(monkeypatch, lambda path: (model, method, {"method": {"name": "lora", "config": {"r": 4}}}))

    out = tmp_path / "out"
    assert analyze_main([str(make_run_dir(tmp_path)), "--out", str(out), "--no-plots"]) == 0
    spectra = pd.read_csv(out / "spectra.csv")
    for name, layer in method.layers(model).items():
        expected = np.linalg.svd(layer.delta_weight().double().numpy(), compute_uv=False)[:4]
        assert rel_err(spectra[spectra["module"] == name]["sigma"], expected) < 1e-6
    assert len(pd.read_csv(out / "amplification.csv")) == len(method.layers(model)) == 4


def test_analyze_full_finetuning_run_with_dense_updates(tmp_path, monkeypatch, capsys):
    from peftlab.methods.full import Full, FullConfig

    reference = tiny_llama64(seed=0)
    model = tiny_llama64(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method = Full(FullConfig())
    method.apply(model)
    method.reference = reference
    fake_runs_module(monkeypatch, lambda path: (model, method, {"method": {"name": "full", "config": {}}}))
    run = make_run_dir(tmp_path)

    out = tmp_path / "out"
    assert analyze_main([str(run), "--out", str(out), "--no-plots"]) == 0
    assert "amplification skipped for dense updates (pass --amp-rank R)" in capsys.readouterr().out
    ranks = pd.read_csv(out / "ranks.csv")
    assert len(ranks) == 2 * 7 and set(ranks["spectrum"]) == {"full"} and set(ranks["method"]) == {"full"}
    name = "model.layers.1.mlp.down_proj"
    delta = (model.get_submodule(name).weight - reference.get_submodule(name).weight).detach().double().numpy()
    spectra = pd.read_csv(out / "spectra.csv")
    assert rel_err(spectra[spectra["module"] == name]["sigma"], np.linalg.svd(delta, compute_uv=False)) < 1e-6

    assert analyze_main([str(run), "--out", str(out), "--no-plots", "--amp-rank", "4"]) == 0
    assert len(pd.read_csv(out / "amplification.csv")) == 2 * 7


def test_run_without_weight_delta_is_not_applicable(tmp_path, monkeypatch, capsys):
    method = types.SimpleNamespace(name="prefix", has_weight_delta=False)
    fake_runs_module(monkeypatch, lambda path: (nn.Linear(2, 2), method, {"method": {"name": "prefix"}}))
    run = make_run_dir(tmp_path)
    assert analyze_main([str(run), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"not applicable: {run}: method 'prefix' has no weight delta" in out
    assert not (tmp_path / "out").exists()

# --------------------------------------------------------------------------- #
# bad input: one clear line, status 2
# --------------------------------------------------------------------------- #
def test_path_that_is_neither_run_nor_adapter(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analyze_main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {empty}: neither a peftlab run") and "\n" not in err
    assert analyze_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_failed_run_without_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "failed", "reason": "RuntimeError: out of memory\nmore"}))
    assert analyze_main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: run status is 'failed' (RuntimeError: out of memory); it saved no adapter"


def test_compare_with_no_matching_modules(tmp_path, capsys):
    save_peft_adapter(tmp_path / "qv")
    save_peft_adapter(tmp_path / "ko", target_modules=["k_proj", "o_proj"])
    status = analyze_main([str(tmp_path / "qv"), "--compare", str(tmp_path / "ko"), "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'qv'} vs {tmp_path / 'ko'}: no matching modules between runs")
    assert "\n" not in err


def test_non_lora_peft_adapter_is_rejected(tmp_path, capsys):
    save_peft_adapter(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert analyze_main([str(tmp_path / "adapter")]) == 2
    assert "peft_type 'IA3' is not supported" in capsys.readouterr().err


def test_diverged_adapter_gives_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    save_peft_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.v_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'adapter'}: module model.layers.1.self_attn.v_proj: "
                   "update has non-finite entries (diverged run?)")


def test_wandb_logger_gets_the_tables_and_plots(tmp_path, monkeypatch):
    """`--logger wandb` (offline, no login) writes a W&B run holding every table and plot."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_peft_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    assert analyze_main([str(tmp_path / "adapter"), "--out", str(out), "--logger", "wandb"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = {p.name for p in runs[0].rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in logged)
    media = {p.stem.rsplit("_", 2)[0] for p in (runs[0] / "files" / "media").rglob("*") if p.is_file()}
    assert "ranks" in media and "spectra" in media and any(m.startswith("effective_rank") for m in media), media
