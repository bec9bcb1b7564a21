"""`peftlab table`: rows per configuration over seeds, failed / missing runs, lr selection,
formats, CLI exit codes, and the sweep summary (table files + W&B group) of a real multirun."""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.errors import ConfigError
from peftlab.reporting.table import build_table, format_params, latex_escape
from peftlab.training.tracking import sweep_group

DATA = Path(__file__).resolve().parents[1] / "data"
# a real result.json (smollm2-135m + LoRA r=4, 12 steps; a copy of results/forgetting_smollm2/lora_r4's,
# so no test reads committed results): the fakes below change only what a test needs
TEMPLATE = json.loads((DATA / "result_smollm2_lora_r4.json").read_text())


def fake_run(folder: Path, *, method: str = "lora", r: int = 4, lr: float = 1e-3, seed: int = 0,
             test: float = 0.8, val: float = 0.7, base: float = 0.5, loss: float = 1.0, val_loss: float = 1.0,
             forgetting: float = 0.03, trainable: int = 230_400, status: str = "ok", reason: str | None = None,
             name: str | None = None) -> Path:
    """Write a result.json with the real schema; ``status="failed"`` writes what trainer.run
    records for a run stopped by bad input (raw config, no metrics)."""
    result = copy.deepcopy(TEMPLATE)
    config = result["config"]
    config["method"] = {"name": "full"} if method == "full" else {**config["method"], "name": method, "r": r}
    config["optim"]["lr"] = lr
    config["seed"] = result["seed"] = seed
    run_dir = folder / (name or f"{method}_r{r}_lr{lr:g}_s{seed}")
    if status == "failed":
        result = {"schema_version": 1, "status": "failed", "reason": reason, "run_dir": str(run_dir),
                  "config": config, "seed": seed}
    else:
        result.update(status=status, reason=reason, run_dir=str(run_dir))
        result["method"]["name"] = method
        result["params"]["trainable"] = trainable
        result["metrics"]["before"]["test"]["accuracy"] = base
        result["metrics"]["after"]["test"].update(accuracy=test, loss=loss)
        result["metrics"]["after"]["validation"].update(accuracy=val, loss=val_loss)
        result["forgetting"]["mean"] = forgetting
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def rows_by(table, key: str) -> dict:
    return {row.config[key]: row for row in table.rows}


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #
def test_mean_sample_std_median_and_n_over_seeds(tmp_path):
    for seed, accuracy in enumerate([0.70, 0.80, 0.81]):
        fake_run(tmp_path, r=8, seed=seed, test=accuracy)
    fake_run(tmp_path, r=4, test=0.9)
    table = build_table([tmp_path])
    assert table.keys == ["method.name", "method.r"]  # seed is never a row key
    three, one = rows_by(table, "method.r")[8], rows_by(table, "method.r")[4]
    assert three.test.n == 3 and one.test.n == 1
    assert three.test.mean == pytest.approx(0.77)
    assert three.test.std == pytest.approx(math.sqrt((0.07**2 + 0.03**2 + 0.04**2) / 2))  # ddof=1
    assert three.test.median == pytest.approx(0.80)
    markdown = table.render("md")
    assert "0.7700 ± 0.0608" in markdown
    assert re.search(r"\|\s+0\.9000 \|", markdown), markdown  # one seed: just the mean, no ±


@pytest.mark.parametrize("count,text", [(512, "512"), (73_728, "73.7K"), (294_912, "0.3M"), (4_718_592, "4.7M"),
                                        (22_713_986, "22.7M"), (6_738_415_616, "6.7B"), (None, "")])
def test_trainable_parameters_in_lora_paper_style(count, text):
    assert format_params(count) == text


def test_full_fine_tuning_row_shows_the_full_count_and_columns(tmp_path):
    fake_run(tmp_path, method="full", trainable=134_515_008, test=0.77, base=0.74, forgetting=0.0563)
    fake_run(tmp_path, method="lora", trainable=73_728, test=0.68, base=0.74, forgetting=0.0287)
    table = build_table([tmp_path])
    header, *body = [line for line in table.render("md").splitlines() if line.startswith("|")]
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert titles[:3] == ["method.name", "status", "params"]
    for title in ["params", "base accuracy", "accuracy", "median", "n", "train s", "peak MiB", "train MiB", "est. MiB",
                  "forgetting"]:
        assert title in titles, titles
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in body[1:]}
    full = dict(zip(titles, cells["full"]))
    assert full["params"] == "134.5M" and full["base accuracy"] == "0.7400" and full["forgetting"] == "0.0563"
    assert dict(zip(titles, cells["lora"]))["params"] == "73.7K"
    memory = TEMPLATE["memory"]
    assert full["peak MiB"] == f"{memory['peak_bytes'] / 2**20:.0f}"
    # like with like: measured RSS growth beside the estimate of what training adds (not its total)
    assert full["train MiB"] == f"{(memory['peak_bytes'] - memory['baseline_bytes']) / 2**20:.0f}"
    est = memory["estimate"]
    resident = sum(est.get(k) or 0 for k in ("frozen_weights", "quant_constants", "trainable_weights", "kv_cache",
                                               "overhead"))
    assert full["est. MiB"] == f"{(est['total_bytes'] - resident) / 2**20:.0f}" != f"{est['total_bytes'] / 2**20:.0f}"


def test_memory_columns_compare_like_with_like_on_cuda_and_cpu():
    from peftlab.memory.measure import training_growth
    from peftlab.reporting.table import estimated_training_bytes

    cpu = {"memory": {"kind": "rss_peak", "peak_bytes": 900, "baseline_bytes": 600,
                      "estimate": {"total_bytes": 1000, "training_bytes": 310, "allocated_bytes": 950}}}
    assert (training_growth(cpu["memory"]), estimated_training_bytes(cpu)) == (300, 310)
    cuda = {"memory": {"kind": "cuda_max_memory_allocated", "peak_bytes": 900, "baseline_bytes": 600,
                       "estimate": {"total_bytes": 1000, "training_bytes": 310, "allocated_bytes": 950}}}
    assert (training_growth(cuda["memory"]), estimated_training_bytes(cuda)) == (900, 950)
    assert training_growth({}) is None and estimated_training_bytes({"memory": {"estimate": {}}}) is None


def test_default_keys_skip_bookkeeping_and_keys_that_follow_the_method(tmp_path):
    a = fake_run(tmp_path, method="lora", r=4)
    fake_run(tmp_path, method="full")
    result = json.loads((a / "result.json").read_text())
    result["config"]["logger"]["group"] = "another-sweep"  # bookkeeping: never a default key
    result["config"]["study"] = {"lr": {"vera": 0.05}}  # a study's settings act through optim.lr & co.
    (a / "result.json").write_text(json.dumps(result))
    assert build_table([tmp_path]).keys == ["method.name"]  # method.r only follows method.name here
    fake_run(tmp_path, method="lora", r=8)
    assert build_table([tmp_path]).keys == ["method.name", "method.r"]
    assert build_table([tmp_path], by=["optim.lr"]).keys == ["optim.lr"]


# --------------------------------------------------------------------------- #
# Failed and missing runs
# --------------------------------------------------------------------------- #
def test_failed_configurations_get_a_row_with_status_and_reason(tmp_path):
    reason = "method.r: got 0; allowed: an integer >= 1"
    fake_run(tmp_path, r=0, seed=0, status="failed", reason=reason)
    fake_run(tmp_path, r=0, seed=1, status="failed", reason=reason)
    fake_run(tmp_path, r=4, seed=0, test=0.8)
    fake_run(tmp_path, r=4, seed=1, test=0.6)
    fake_run(tmp_path, r=4, seed=2, status="diverged", reason="loss became nan at step 3")
    table = build_table([tmp_path])
    rows = rows_by(table, "method.r")
    assert rows[0].status() == "failed (2)" and rows[0].test is None
    assert rows[0].reason() == f"failed: {reason} (x2)"
    assert rows[4].status() == "2 ok / 3" and rows[4].test.n == 2 and rows[4].test.mean == pytest.approx(0.7)
    assert "diverged: loss became nan at step 3" in rows[4].reason()
    markdown = table.render("md")
    assert "failed (2)" in markdown and "2 ok / 3" in markdown and "got 0" in markdown


def write_sweep(sweep: Path, present: dict[int, bool]) -> None:
    """A Hydra sweep dir of ``method.r=4,8 seed=0,1`` (jobs 0-3, r outermost): multirun.yaml plus
    the job dirs in ``present`` (job number -> whether its run wrote result.json)."""
    base = copy.deepcopy(TEMPLATE["config"])
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
             "overrides": {"task": ["trainer.max_steps=12", "method.r=4,8", "seed=0,1"]}}
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, **base}))
    for number, finished in present.items():
        r, seed = (4, 8)[number // 2], number % 2
        job = sweep / f"{number}_lora_s{seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": number}}}))
        result = copy.deepcopy(TEMPLATE)
        result["config"]["method"]["r"], result["config"]["seed"], result["run_dir"] = r, seed, str(job)
        (job / "config.yaml").write_text(yaml.safe_dump(result["config"]))
        if finished:
            (job / "result.json").write_text(json.dumps(result))


def test_missing_jobs_of_a_sweep_are_shown_in_their_rows(tmp_path):
    write_sweep(tmp_path / "sweep", {0: True, 1: False, 2: True})  # job 3 (r=8, seed 1) never started
    rows = rows_by(build_table([tmp_path / "sweep"]), "method.r")
    assert set(rows) == {4, 8}
    assert rows[4].status() == "1 ok / 2" and rows[4].reason() == "missing: 1_lora_s1 started, no result.json"
    assert rows[8].status() == "1 ok / 2" and rows[8].reason() == "missing: job 3 never started (method.r=8 seed=1)"


def test_a_sweep_with_every_job_missing_but_one(tmp_path):
    write_sweep(tmp_path / "sweep", {0: True})
    rows = rows_by(build_table([tmp_path / "sweep"]), "method.r")
    assert rows[4].status() == "1 ok / 2"
    assert rows[8].status() == "missing (2)" and rows[8].test is None
    assert "job 2 never started" in rows[8].reason() and "job 3 never started" in rows[8].reason()


# --------------------------------------------------------------------------- #
# Metric choice and lr selection
# --------------------------------------------------------------------------- #
def test_select_lr_picks_by_validation_and_reports_test(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, r=4, lr=1e-4, seed=seed, val=0.90, test=0.50)  # best on validation
        fake_run(tmp_path, r=4, lr=1e-3, seed=seed, val=0.60, test=0.95)  # best on test: must not win
        fake_run(tmp_path, r=8, lr=1e-4, seed=seed, val=0.60, test=0.70)
        fake_run(tmp_path, r=8, lr=1e-3, seed=seed, val=0.80, test=0.75)
    table = build_table([tmp_path], select_lr=True)
    rows = rows_by(table, "method.r")
    assert len(table.rows) == 2
    assert rows[4].config["optim.lr"] == 1e-4 and rows[4].test.mean == pytest.approx(0.50)
    assert rows[8].config["optim.lr"] == 1e-3 and rows[8].test.mean == pytest.approx(0.75)
    assert rows[4].lr_tried == (1e-4, 1e-3)
    header = table.render("md").splitlines()[0]
    assert "optim.lr (best val)" in header and "lr tried" in header and "val accuracy" in header


def test_lower_is_better_metrics_select_the_lowest_validation_value(tmp_path):
    fake_run(tmp_path, lr=1e-4, val_loss=1.0, loss=2.0)
    fake_run(tmp_path, lr=1e-3, val_loss=1.5, loss=0.5)
    table = build_table([tmp_path], metric="loss", select_lr=True)
    (row,) = table.rows
    assert row.config["optim.lr"] == 1e-4 and row.test.mean == pytest.approx(2.0)
    assert re.search(r"\|\s+loss \|", table.render("md").splitlines()[0])


def test_forgetting_metric_and_unknown_metric(tmp_path):
    fake_run(tmp_path, seed=0, forgetting=0.02)
    fake_run(tmp_path, seed=1, forgetting=0.04)
    (row,) = build_table([tmp_path], metric="forgetting").rows
    assert row.test.mean == pytest.approx(0.03) and row.base is None
    (row,) = build_table([tmp_path], metric="forgetting.chat").rows
    assert row.test.mean == pytest.approx(TEMPLATE["forgetting"]["probes"]["chat"]["forgetting"])
    with pytest.raises(ConfigError, match=r"^--metric: no run reports 'bleu'; allowed: accuracy, forgetting"):
        build_table([tmp_path], metric="bleu")


# --------------------------------------------------------------------------- #
# Formats
# --------------------------------------------------------------------------- #
def test_csv_parses_with_raw_numbers(tmp_path):
    fake_run(tmp_path, r=4, seed=0, test=0.7)
    fake_run(tmp_path, r=4, seed=1, test=0.8)
    fake_run(tmp_path, r=8, status="failed", reason="method.r: got 8, no")
    records = list(csv.DictReader(io.StringIO(build_table([tmp_path]).render("csv"))))
    assert [r["method.r"] for r in records] == ["4", "8"]
    ok, failed = records
    assert float(ok["accuracy_mean"]) == pytest.approx(0.75)
    assert float(ok["accuracy_std"]) == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert int(ok["n"]) == 2 and int(ok["trainable"]) == 230_400 and ok["status"] == "ok"
    assert failed["status"] == "failed (1)" and failed["reason"] == "failed: method.r: got 8, no"
    assert failed["accuracy_mean"] == ""


def test_latex_is_a_booktabs_tabular_with_escapes(tmp_path):
    fake_run(tmp_path, r=4, seed=0, test=0.7)
    fake_run(tmp_path, r=4, seed=1, test=0.8)
    fake_run(tmp_path, r=8, status="failed", reason="50% of task_x failed")
    latex = build_table([tmp_path]).render("latex")
    lines = latex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{") and lines[-1] == r"\end{tabular}"
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2] == r"\bottomrule"
    assert lines[2].startswith(r"method.name & method.r & status") and "peak MiB" in lines[2]
    columns = len(re.search(r"\{tabular\}\{(\w+)\}", lines[0]).group(1))
    for line in [lines[2], *lines[4:-2]]:
        assert line.endswith(r" \\") and line.count(" & ") == columns - 1, line
    assert r"0.7500 $\pm$ 0.0707" in latex
    assert r"50\% of task\_x failed" in latex and "±" not in latex
    assert latex_escape("a_b & 5% ± {x}") == r"a\_b \& 5\% $\pm$ \{x\}"


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    fake_run(tmp_path / "runs", r=4)
    assert main(["table", str(tmp_path / "runs"), "--out", str(tmp_path / "t.tex")]) == 0
    assert r"\toprule" in capsys.readouterr().out  # the format follows --out's suffix
    assert (tmp_path / "t.tex").read_text().startswith(r"\begin{tabular}")
    assert main(["table", str(tmp_path / "runs"), "--format", "csv", "--by", "method.name,method.r"]) == 0
    assert capsys.readouterr().out.startswith("method.name,method.r,status,")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'empty'}: no result.json under it; "
                   "allowed: run or sweep directories of peftlab train"]
    fake_run(tmp_path / "runs")
    assert main(["table", str(tmp_path / "runs"), "--by", "method.name,method.rank"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --by: unknown key 'method.rank'") and "method.r" in err[0]
    assert main(["nosuch"]) == 2
    assert "table" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Sweep summary: a real multirun (every job fails fast on bad input, so nothing loads)
# --------------------------------------------------------------------------- #
def test_sweep_writes_its_table_and_logs_it_to_its_wandb_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setattr(sys, "argv", ["peftlab"])  # train_main rewrites argv for Hydra
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05"
    code = main(["train", "-m", f"hydra.sweep.dir={sweep}", "method.r=0,-3", "seed=0,1", "trainer.progress=false",
                 "logger=wandb", "logger.mode=offline"])
    assert code == 0
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert len(results) == 4 and {r["status"] for r in results} == {"failed"}
    assert {r["config"]["logger"]["group"] for r in results} == {"2026-01-02_03-04-05"} == {sweep_group(sweep)}
    markdown = (sweep / "table.md").read_text()
    assert re.search(r"\| lora +\| -3 +\| failed \(2\) +\|", markdown), markdown
    assert "got 0; allowed: an integer >= 1 (x2)" in markdown
    records = list(csv.DictReader(io.StringIO((sweep / "table.csv").read_text())))
    assert [(r["method.r"], r["status"]) for r in records] == [("-3", "failed (2)"), ("0", "failed (2)")]
    import wandb

    wandb.teardown()  # the W&B service writes the run file in the background: let it finish
    (summary,) = sweep.glob("wandb/offline-run-*/run-*.wandb")  # the summary run, offline, in the sweep dir
    assert b"2026-01-02_03-04-05" in summary.read_bytes() and b"sweep-summary" in summary.read_bytes()
    (logged,) = summary.parent.glob("files/media/table/sweep_table_*.table.json")
    assert json.loads(logged.read_text())["columns"][:3] == ["method.name", "method.r", "status"]


def test_sweep_without_wandb_writes_tables_only(tmp_path):
    from omegaconf import OmegaConf

    from peftlab.training.callbacks import SweepSummary

    write_sweep(tmp_path / "sweep", {0: True, 1: True, 2: True, 3: True})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}},
                               "logger": TEMPLATE["config"]["logger"]})  # logger=none
    SweepSummary().on_multirun_end(config)
    assert "| lora" in (tmp_path / "sweep" / "table.md").read_text()
    assert (tmp_path / "sweep" / "table.csv").read_text().startswith("method.name,method.r,")
    assert not (tmp_path / "sweep" / "wandb").exists()


# --------------------------------------------------------------------------- #
# A real run
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_table_of_a_real_tiny_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["peftlab"])
    overrides = ["trainer.max_steps=2", "trainer.batch_size=4", "task.max_train_examples=16",
                 "task.max_eval_examples=8", "task.probes=[]", "trainer.progress=false",
                 "trainer.save_adapter=false", f"hydra.run.dir={tmp_path}/run"]
    assert main(["train", *overrides]) == 0
    capsys.readouterr()
    table = build_table([tmp_path])
    (row,) = table.rows
    assert row.status() == "ok" and row.test.n == 1 and row.trainable == 73_728
    assert 0.0 <= row.test.mean <= 1.0 and row.estimate_mib > 0 and row.peak_mib > 0
    assert "73.7K" in table.render("md")


def test_a_never_started_job_resolves_the_study_lr_of_its_method():
    """A study's per-method lr (``${study.lr.${method.name}}``) shows as the value that job would use."""
    from peftlab.reporting.sweeps import job_config

    base = {"study": {"lr": {"lora": 1e-3, "dora": 2e-3}}, "method": {"name": "lora", "r": 8},
            "optim": {"lr": "${study.lr.${method.name}}"}}
    assert job_config(base, ["method=dora"])["optim"]["lr"] == 2e-3
    assert job_config(base, ["seed=1"])["optim"]["lr"] == 1e-3
