"""Resumable sweeps: a killed sweep, re-run, ends with the result files of an uninterrupted one;
ok runs of the same config are skipped, failed ones re-run, ok runs of another config are kept.

The sweep is small and CPU-only: a 2-layer × 32 BERT (random weights, the real MiniLM tokenizer)
on a 12-example CSV task, AdaLoRA with dropout (so the resume must restore RNG states and the
method's importance EMAs / masks), 6 steps crossing an epoch boundary, a checkpoint every 2.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_encoder_files
from peftlab.training.checkpoint import FAIL_AT_STEP_ENV, KILLED_EXIT_CODE, Checkpointer, Progress, config_hash
from peftlab.cli import main
from peftlab.config import compose, validate
from peftlab.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
# fields that say when / where / how fast a run went, not what it computed
VOLATILE = {"run_dir", "provenance", "wall_time_s", "memory"}
VOLATILE_TRAIN = {"train_time_s", "tokens_per_s"}
VOLATILE_ROW = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Overrides for a 2-job sweep (seed=0,1) on a tiny BERT and a tiny CSV task."""
    root = tmp_path_factory.mktemp("resume_inputs")
    tiny_encoder_files(root)
    return [
        "model=hf", f"model.path={root / 'model'}", "model.kind=encoder",
        "task.source=csv", f"+task.path={root / 'reviews.csv'}", "task.validation_size=8", "task.test_size=8",
        "task.max_train_examples=12", "task.max_length=16", "task.probes=[]",
        "method=adalora", "method.init_r=4", "method.target_r=2", "method.tinit=1", "method.tfinal=1",
        "method.dropout=0.1",
        "trainer.max_steps=6", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.log_every=1",
        "trainer.checkpoint_every=2", "trainer.progress=false", "trainer.threads=1",
    ]


def sweep(inputs: list[str], sweep_dir: Path, *extra: str) -> int:
    return main(["train", "-m", *inputs, "seed=0,1", f"hydra.sweep.dir={sweep_dir}", *extra])


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


def comparable(run_dir: Path) -> dict:
    """result.json, metrics.jsonl rows and adapter tensors without time, place and speed."""
    result = json.loads((run_dir / "result.json").read_text())
    for key in VOLATILE:
        result.pop(key)
    for key in VOLATILE_TRAIN:
        result["train"].pop(key)
    result["config"].pop("logger")  # its W&B group is named after the sweep dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if k not in VOLATILE_ROW} for row in rows]
    adapter = load_file(run_dir / "adapter" / "adapter.safetensors")
    return {"result": result, "rows": rows, "adapter": {k: v.tolist() for k, v in adapter.items()}}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The same sweep, never interrupted."""
    sweep_dir = tmp_path_factory.mktemp("reference") / "sweep"
    assert sweep(inputs, sweep_dir) == 0
    return sweep_dir


@pytest.fixture
def resume_spy(monkeypatch) -> list[int]:
    """The step each run in this process starts training from (0 = from scratch)."""
    starts: list[int] = []
    original = Trainer.resume

    def spy(self, *args, **kwargs):
        progress = original(self, *args, **kwargs)
        starts.append(progress.step)
        return progress

    monkeypatch.setattr(Trainer, "resume", spy)
    return starts


def test_killed_sweep_resumes_to_the_uninterrupted_result(inputs, reference, tmp_path, resume_spy):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), FAIL_AT_STEP_ENV: "4"}
    command = [sys.executable, "-m", "peftlab.cli", "train", "-m", *inputs, "seed=0,1", f"hydra.sweep.dir={sweep_dir}"]
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == KILLED_EXIT_CODE, killed.stderr[-2000:]
    (first,) = job_dirs(sweep_dir)  # the kill came in job 0; job 1 never started
    assert not (first / "result.json").exists()
    assert (first / "checkpoint" / "checkpoint.pt").exists()
    assert [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]

    assert sweep(inputs, sweep_dir) == 0
    assert resume_spy == [4, 0]  # job 0 continued from its checkpoint after step 4; job 1 ran from scratch
    resumed, uninterrupted = job_dirs(sweep_dir), job_dirs(reference)
    assert [d.name for d in resumed] == [d.name for d in uninterrupted]
    for ours, theirs in zip(resumed, uninterrupted):
        mine, want = comparable(ours), comparable(theirs)
        assert mine["result"]["status"] == "ok"
        assert mine == want, ours.name
        assert not (ours / "checkpoint").exists()  # a finished run keeps no checkpoint


def test_rerun_skips_ok_runs_and_reruns_failed_ones(inputs, reference, tmp_path, capsys, resume_spy):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(reference, sweep_dir)
    first, second = job_dirs(sweep_dir)
    failed = json.loads((second / "result.json").read_text())
    failed.update(status="failed", reason="RuntimeError: out of memory")
    (second / "result.json").write_text(json.dumps(failed))
    before = (first / "result.json").stat().st_mtime_ns

    assert sweep(inputs, sweep_dir) == 0
    out = capsys.readouterr().out
    assert f"skip: {first} (ok, same config)" in out and f"skip: {second}" not in out
    assert resume_spy == [0]  # only the failed job trained, from scratch (its checkpoint was removed)
    assert (first / "result.json").stat().st_mtime_ns == before
    assert comparable(second) == comparable(reference / second.name)  # metrics.jsonl was not appended to


def test_ok_result_of_another_config_is_refused_unless_overwrite(inputs, reference, tmp_path, capsys, resume_spy):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(reference, sweep_dir)
    kept = {d: (d / "result.json").read_bytes() for d in job_dirs(sweep_dir)}

    assert sweep(inputs, sweep_dir, "optim.lr=1e-3") == 0  # a sweep goes on past a refused job
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(e.startswith("error: trainer.overwrite: ") and "another config" in e
                                    for e in errors), errors
    assert resume_spy == []
    assert {d: (d / "result.json").read_bytes() for d in job_dirs(sweep_dir)} == kept

    assert sweep(inputs, sweep_dir, "optim.lr=1e-3", "trainer.overwrite=true", "trainer.max_steps=3") == 0
    assert resume_spy == [0, 0]
    for run_dir in job_dirs(sweep_dir):
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "ok" and result["config"]["optim"]["lr"] == 1e-3


def test_config_hash_ignores_only_what_does_not_change_results():
    run = validate(compose(["trainer.max_steps=6"]))
    reference = config_hash(run)
    same = {"out_dir": "elsewhere", "logger.name": "wandb", "logger.mode": "online", "trainer.progress": False,
            "trainer.threads": 3, "trainer.checkpoint_every": 7, "trainer.overwrite": True,
            "study": {"name": "x", "lr": {"vera": 5e-2}}}
    other = {"trainer.max_steps": 7, "seed": 1, "optim.lr": 1e-3, "method.r": 4, "trainer.log_every": 3,
             "trainer.eval_batch_size": 8, "task.max_train_examples": 100, "model.path": "/elsewhere"}
    for dotted, value in {**same, **other}.items():
        changed = copy.deepcopy(run)
        *group, key = dotted.split(".")
        setattr(getattr(changed, group[0]) if group else changed, key, value)
        assert (config_hash(changed) == reference) == (dotted in same), dotted


def test_checkpoint_round_trip_and_another_runs_checkpoint_is_dropped(tmp_path):
    saved = Progress(step=4, epoch=1, tokens=96, examples=16, loss=0.5, train_time_s=2.0)
    Checkpointer(tmp_path, "config-a/data", every=2).save(saved, {"parameters": {"w": torch.arange(3.0)}})
    progress, state = Checkpointer(tmp_path, "config-a/data", every=2).load()
    assert progress == saved and torch.equal(state["parameters"]["w"], torch.arange(3.0))
    assert Checkpointer(tmp_path, "config-b/data", every=2).load() is None
    assert not (tmp_path / "checkpoint").exists()


def test_tracker_rewind_keeps_rows_before_the_step_and_drops_a_cut_row(tmp_path):
    from peftlab.config import LoggerConfig
    from peftlab.training.tracking import Tracker

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(4)) + '{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(rows)  # a kill cut the last row short
    tracker = Tracker(LoggerConfig(), tmp_path, {}, name="t")
    tracker.rewind(10)
    assert steps() == [0, 1, 2, 3]
    tracker.rewind(2)
    tracker.log(2, {"loss": 0.25})
    tracker.finish()
    assert steps() == [0, 1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 0.25


def test_a_crashing_job_is_recorded_and_the_sweep_goes_on(inputs, tmp_path, monkeypatch):
    """Job 0 crashes mid-training (not bad input): its result.json says failed with the error,
    job 1 still runs, and a re-run retrains only the failed job."""
    original = Trainer.fit

    def fit(self, tracker):
        if self.cfg.seed == 0:
            raise RuntimeError("simulated crash in training")
        return original(self, tracker)

    monkeypatch.setattr(Trainer, "fit", fit)
    sweep_dir = tmp_path / "sweep"
    assert sweep(inputs, sweep_dir) == 0
    results = [json.loads((job / "result.json").read_text()) for job in job_dirs(sweep_dir)]
    assert [r["status"] for r in results] == ["failed", "ok"]
    assert results[0]["reason"] == "RuntimeError: simulated crash in training"

    monkeypatch.setattr(Trainer, "fit", original)
    assert sweep(inputs, sweep_dir) == 0
    assert [json.loads((job / "result.json").read_text())["status"] for job in job_dirs(sweep_dir)] == ["ok", "ok"]


def test_joblib_launcher_runs_jobs_in_parallel_with_the_same_results(inputs, reference, tmp_path):
    """hydra/launcher=joblib (one process per job) gives the result files of the sequential sweep."""
    sweep_dir = tmp_path / "sweep"
    assert sweep(inputs, sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2") == 0
    ours, theirs = job_dirs(sweep_dir), job_dirs(reference)
    assert [d.name for d in ours] == [d.name for d in theirs]
    for mine, want in zip(ours, theirs):
        assert comparable(mine) == comparable(want), mine.name


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher"),
                                               ("submitit_local", "LocalLauncher")])
def test_launcher_configs_compose(launcher, target):
    """The launchers the README documents compose with peftlab's config (SLURM keys included)."""
    cfg = compose_with_hydra([f"hydra/launcher={launcher}", "method=lora"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "submitit_slurm":
        assert {"partition", "timeout_min", "gpus_per_node", "cpus_per_task"} <= set(cfg.hydra.launcher)


def compose_with_hydra(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from peftlab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
