"""Bad input stops before training with one line naming the key, exit code 2, and no `ok` result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main

FAST = ["trainer.max_steps=1", "trainer.progress=false", "task.max_eval_examples=8"]


def run_cli(capsys, tmp_path, *overrides):
    code = main(["train", f"out_dir={tmp_path}", *FAST, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def no_ok_result(tmp_path: Path):
    for path in tmp_path.rglob("result.json"):
        assert json.loads(path.read_text())["status"] != "ok"


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["method=nosuch"], r"^error: method: unknown method 'nosuch'; allowed: .*lora"),
        (["task=nosuch"], r"^error: task: unknown task 'nosuch'; allowed: .*sentiment"),
        (["model=nosuch"], r"^error: model: unknown model 'nosuch'; allowed: .*minilm"),
        (["method.rank=4"], r"^error: method\.rank: unknown key; allowed keys: .*\br\b"),
        (["method.r=0"], r"^error: method\.r: got 0; allowed: an integer >= 1$"),
        (["method.r=-3"], r"^error: method\.r: got -3; allowed"),
        (["method.alpha=0"], r"^error: method\.alpha: got 0.0; allowed: a number > 0"),
        (["method.dropout=1.0"], r"^error: method\.dropout: got 1.0; allowed: a number in \[0.0, 1.0\)"),
        (["method.dropout=-0.1"], r"^error: method\.dropout: got -0.1"),
        (["trainer.precision=fp8"], r"^error: trainer\.precision: got 'fp8'; allowed: fp32, bf16"),
        (["trainer.checkpoint_every=-1"], r"^error: trainer\.checkpoint_every: got -1; allowed: an integer >= 0"),
        (["task.source=csv", "task.path=/nonexistent/reviews.csv"], r"^error: task\.path: /nonexistent/reviews.csv does not exist"),
    ],
)
def test_bad_input_fails_fast_with_one_line(capsys, tmp_path, overrides, pattern):
    code, err = run_cli(capsys, tmp_path, *overrides)
    assert code == 2
    assert len(err) == 1, err
    assert __import__("re").match(pattern, err[0]), err[0]
    no_ok_result(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["method.r=385"], r"^error: method\.r: got 385; allowed: an integer in \[1, 384\] \(min\(d, k\) of bert\."),
        (["method.targets=[gate]"], r"^error: method\.targets: 'gate' is not a target of a bert model; allowed: .*down"),
        (["method.targets=[re:nothing.*]"], r"^error: method\.targets: .* matches no module"),
        (["model=smollm2-135m", "method=bitfit"], r"^error: method: bitfit needs bias parameters, and this llama model has none"),
    ],
)
def test_bad_input_against_the_model_fails_before_training(capsys, tmp_path, overrides, pattern):
    code, err = run_cli(capsys, tmp_path, *overrides)
    assert code == 2
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and __import__("re").match(pattern, lines[0]), err
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["status"] == "failed" and result["reason"] == lines[0][len("error: "):]
    assert "train" not in result  # stopped before training


def test_command_line_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", "method.r=0", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: method.r: got 0; allowed: an integer >= 1"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_sweep_takes_keys_its_task_yaml_does_not_state():
    """task.path (not in task=sentiment's YAML) works beside a swept value, as in a single run."""
    from peftlab.cli import check_overrides

    out = check_overrides(["task.source=csv", "task.path=/data/mine.csv", "task.text_column=review", "seed=0,1"])
    assert out == ["task.source=csv", "+task.path=/data/mine.csv", "+task.text_column=review", "seed=0,1"]
    assert check_overrides(["+task.path=/x.csv", "seed=0,1"]) == ["+task.path=/x.csv", "seed=0,1"]
