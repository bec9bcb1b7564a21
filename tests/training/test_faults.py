"""Faults a long sweep meets (issue 20): corrupt checkpoints, two processes in one run dir,
signals, a killed overwrite, runaway losses, file modes, a kill after the last checkpoint,
read-only directories and full disks.

Every run is a subprocess of ``peftlab train`` (or, where a spy must count calls, in-process)
on the tiny BERT + tiny CSV task of test_checkpoint.py: a 2-layer × 32 BERT with random
weights, 12 training examples, LoRA, a checkpoint every 2 steps. The inputs live in a
world-readable temp dir so that runs as ``nobody`` (mode bits do not bind root) can read them.
"""
from __future__ import annotations

import ctypes
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_encoder_files
from peftlab.cli import main
from peftlab.errors import ConfigError
from peftlab.training.checkpoint import (FAIL_AT_STEP_ENV, KILLED_EXIT_CODE, LOCK_FILE, REPLACED_RESULT,
                                         RunLock)
from peftlab.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def shared() -> Path:
    """A temp dir every user may read and write (runs as nobody go here too)."""
    root = Path(tempfile.mkdtemp(prefix="peftlab_faults_", dir="/tmp"))
    root.chmod(0o777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(shared) -> list[str]:
    root = shared / "inputs"
    tiny_encoder_files(root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return [
        "model=hf", f"model.path={root / 'model'}", "model.kind=encoder",
        "task.source=csv", f"+task.path={root / 'reviews.csv'}", "task.validation_size=8", "task.test_size=8",
        "task.max_train_examples=12", "task.max_length=16", "task.probes=[]", "method=lora",
        f"trainer.max_steps={STEPS}", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.log_every=1",
        "trainer.checkpoint_every=2", "trainer.progress=false", "trainer.threads=1",
    ]


def command(inputs: list[str], run_dir: Path, *extra: str) -> list[str]:
    if any(e.startswith("method=") for e in extra):  # another method than the inputs' lora
        inputs = [i for i in inputs if not i.startswith("method=")]
    return [sys.executable, "-m", "peftlab.cli", "train", *inputs, f"hydra.run.dir={run_dir}", *extra]


def environment(fail_at: int | None = None, home: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(FAIL_AT_STEP_ENV, None)
    if fail_at is not None:
        env[FAIL_AT_STEP_ENV] = str(fail_at)
    if home is not None:
        env.update(HOME=str(home), HF_HOME=str(home / "hf"))
    return env


def nobody_can_run_python() -> bool:
    """Whether every folder above the interpreter is searchable by others (here it lives under
    /root, mode 0700, so nobody cannot even start it)."""
    real = Path(os.path.realpath(sys.executable))
    return all(folder.stat().st_mode & 0o001 for folder in real.parents) and bool(real.stat().st_mode & 0o001)


def unprivileged():
    """preexec_fn: make the child obey mode bits. As nobody where that user can run this Python;
    else stay root but drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set
    (prctl PR_CAPBSET_DROP), so the exec'd interpreter has neither: a 0555 folder then refuses
    root's writes as it refuses anyone's."""
    if nobody_can_run_python():
        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def can_drop_privileges() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=unprivileged, capture_output=True)
    return probe.returncode == 0


def train(inputs, run_dir, *extra, fail_at=None, user=None, cwd=None, home=None) -> subprocess.CompletedProcess:
    return subprocess.run(command(inputs, run_dir, *extra), cwd=cwd or run_dir.parent, capture_output=True,
                          text=True, timeout=300, env=environment(fail_at, home),
                          preexec_fn=unprivileged if user == "nobody" else None)


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["progress"]["step"]


# ------------------------------------------------------------------ 1. corrupt checkpoints
@pytest.mark.parametrize("damage, resumes_at", [("truncate-newest", 2), ("random-bytes-both", 0)])
def test_a_corrupt_checkpoint_is_named_and_the_run_restarts_from_the_previous_or_step_0(
        inputs, shared, damage, resumes_at):
    run_dir = shared / f"corrupt-{damage}"
    killed = train(inputs, run_dir, fail_at=3)  # checkpoints after steps 2 and 4; killed after step 4 (0-based 3)
    assert killed.returncode == KILLED_EXIT_CODE, killed.stderr[-2000:]
    newest, previous = run_dir / "checkpoint" / "checkpoint.pt", run_dir / "checkpoint" / "checkpoint.prev.pt"
    assert checkpoint_step(newest) == 4 and checkpoint_step(previous) == 2  # the last two are kept
    data = newest.read_bytes()
    if damage == "truncate-newest":
        newest.write_bytes(data[: len(data) // 2])
    else:
        rng = random.Random(0)
        for path in (newest, previous):
            path.write_bytes(bytes(rng.getrandbits(8) for _ in range(len(data))))

    rerun = train(inputs, run_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    no_traceback(rerun)
    warnings = [line for line in rerun.stderr.splitlines() if line.startswith("warning:")]
    assert any(str(newest) in line and "unreadable" in line for line in warnings), warnings
    said = f"resuming from {previous} at step 2" if resumes_at else "no readable checkpoint left; restarting from step 0"
    assert any(said in line for line in warnings), warnings
    assert result(run_dir)["status"] == "ok" and result(run_dir)["train"]["steps"] == STEPS
    assert steps(run_dir) == list(range(STEPS))
    assert not (run_dir / "checkpoint").exists()


# ------------------------------------------------------------------ 4. signals
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_records_interrupted_keeps_a_checkpoint_and_a_rerun_resumes(inputs, shared, sig, code, monkeypatch):
    run_dir = shared / f"signal-{sig.name}"
    long = ["trainer.max_steps=3000", "trainer.checkpoint_every=1000"]
    process = subprocess.Popen(command(inputs, run_dir, *long), cwd=shared, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
        time.sleep(0.02)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = errors(err)
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {run_dir} at step ") and sig.name in lines[0], lines
    stored = result(run_dir)
    done = stored["train"]["steps"]
    assert stored["status"] == "interrupted" and sig.name in stored["reason"] and 1 <= done < 3000
    assert checkpoint_step(run_dir / "checkpoint" / "checkpoint.pt") == done  # written at the step it stopped
    assert steps(run_dir) == list(range(done))

    starts: list[int] = []
    original = Trainer.resume

    def spy(self, *args, **kwargs):
        progress = original(self, *args, **kwargs)
        starts.append(progress.step)
        raise SystemExit(0)  # the resume is what is checked; the rest would train 3000 steps

    monkeypatch.setattr(Trainer, "resume", spy)
    main(["train", *inputs, f"hydra.run.dir={run_dir}", *long])
    assert starts == [done]


# ------------------------------------------------------------------ 2. one process per run dir
def test_a_second_process_is_refused_while_the_lock_is_held_and_a_stale_lock_is_taken(inputs, shared):
    run_dir = shared / "locked"
    run_dir.mkdir()
    lock = RunLock(run_dir).acquire()  # this test process plays the live run
    try:
        refused = train(inputs, run_dir)
    finally:
        lock.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    no_traceback(refused)
    assert errors(refused.stderr) == [
        f"error: {run_dir}: in use by pid {os.getpid()} (lock {run_dir / LOCK_FILE}); allowed: wait for it to end, "
        "or another hydra.run.dir / hydra.sweep.dir"]
    assert not (run_dir / "result.json").exists() and not (run_dir / "metrics.jsonl").exists()

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now
    (run_dir / LOCK_FILE).write_text(f"{gone.pid} {os.uname().nodename}\n")  # a crashed holder's file
    taken = train(inputs, run_dir)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert result(run_dir)["status"] == "ok" and steps(run_dir) == list(range(STEPS))


def test_two_processes_started_together_in_one_run_dir_train_it_once(inputs, shared):
    run_dir = shared / "race"
    processes = [subprocess.Popen(command(inputs, run_dir), cwd=shared, env=environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in outcomes)
    assert steps(run_dir) == list(range(STEPS)), outcomes  # not 0,0,1,1,...
    assert result(run_dir)["status"] == "ok"
    if codes == [0, 2]:  # the usual case: the later one met the lock
        (refused,) = [err for code, _, err in outcomes if code == 2]
        assert errors(refused) and errors(refused)[0].startswith(f"error: {run_dir}: in use by pid "), refused
    else:  # the first one finished before the second looked: that one skipped it
        assert codes == [0, 0] and any(f"skip: {run_dir}" in out for _, out, _ in outcomes), outcomes


# ------------------------------------------------------------------ 6. runaway losses
RUNAWAY = ["method=full", "optim.lr=1e4", "optim.warmup_ratio=0", "trainer.max_steps=12", "trainer.divergence_steps=3"]
# the loss jumps from 0.68 to 11111 at step 1 and stays in the thousands: inside the default 10-step window


def test_a_runaway_loss_ends_diverged_with_the_steps_it_completed(inputs, shared):
    run_dir = shared / "runaway"
    done = train(inputs, run_dir, *RUNAWAY)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = result(run_dir)
    assert stored["status"] == "diverged", (stored["status"], stored["reason"], steps(run_dir))
    assert "above 100 x the early mean loss (0.6" in stored["reason"], stored["reason"]  # step 0's loss alone
    assert stored["train"]["steps"] == 3  # steps 1, 2, 3 above: diverged at step 3, which is not applied
    completed = stored["train"]["steps"]
    assert f"at step {completed}" in stored["reason"]  # the step that diverged never ran ...
    assert steps(run_dir) == list(range(completed))   # ... and every step that ran was logged
    assert stored["metrics"]["after"] is None and stored["adapter"] is None

    off = train(inputs, shared / "runaway-off", *RUNAWAY, "trainer.divergence_factor=0")  # the rule switched off:
    assert off.returncode == 0 and result(shared / "runaway-off")["status"] == "ok"   # the old behaviour, an ok
    losses = [json.loads(line)["loss"] for line in (shared / "runaway-off" / "metrics.jsonl").read_text().splitlines()]
    assert max(losses) > 100 * losses[0]                                                # for a runaway loss


def test_a_non_finite_loss_reports_the_steps_completed(inputs, shared):
    run_dir = shared / "nan"
    done = train(inputs, run_dir, "method=full", "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.max_steps=12",
                 "trainer.divergence_factor=0")
    assert done.returncode == 0, done.stderr[-3000:]
    stored = result(run_dir)
    assert stored["status"] == "diverged" and "loss became" in stored["reason"], stored["reason"]
    assert steps(run_dir) == list(range(stored["train"]["steps"]))  # before: steps counted the one that never ran
    assert f"at step {stored['train']['steps']}" in stored["reason"]


# ------------------------------------------------------------------ 3. overwrite
def test_a_killed_overwrite_leaves_no_stale_ok_result(inputs, shared):
    from peftlab.reporting.sweeps import collect_runs

    run_dir = shared / "overwrite"
    assert train(inputs, run_dir).returncode == 0
    assert result(run_dir)["status"] == "ok" and (run_dir / "adapter").is_dir()
    old = (run_dir / "result.json").read_text()
    killed = train(inputs, run_dir, "seed=1", "trainer.overwrite=true", fail_at=2)
    assert killed.returncode == KILLED_EXIT_CODE, killed.stderr[-3000:]
    assert not (run_dir / "result.json").exists()
    assert (run_dir / REPLACED_RESULT).read_text() == old
    assert not (run_dir / "adapter").exists() and not (run_dir / "predictions.json").exists()
    with pytest.raises(ConfigError, match="no result.json"):  # peftlab table lists nothing here, no stale ok
        collect_runs([run_dir])


def test_an_unreadable_result_is_replaced_only_with_overwrite(inputs, shared):
    run_dir = shared / "unreadable"
    run_dir.mkdir()
    (run_dir / "result.json").write_text('{"status": "ok", "config_ha')
    refused = train(inputs, run_dir)
    assert refused.returncode == 2, refused.stderr[-3000:]
    no_traceback(refused)
    (line,) = errors(refused.stderr)
    assert line.startswith(f"error: trainer.overwrite: {run_dir / 'result.json'} is unreadable"), line
    assert (run_dir / "result.json").read_text() == '{"status": "ok", "config_ha'

    replaced = train(inputs, run_dir, "trainer.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert result(run_dir)["status"] == "ok"
    assert (run_dir / REPLACED_RESULT).read_text() == '{"status": "ok", "config_ha'


# ------------------------------------------------------------------ 7. modes, kill after the last checkpoint
def test_written_files_get_the_umasks_mode(inputs, shared):
    run_dir = shared / "modes"
    killed = train(inputs, run_dir, fail_at=STEPS - 1)
    assert killed.returncode == KILLED_EXIT_CODE
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    assert (run_dir / "checkpoint" / "checkpoint.pt").stat().st_mode & 0o777 == want
    assert train(inputs, run_dir).returncode == 0
    for name in ("result.json", "predictions.json", "config.yaml", "metrics.jsonl", "adapter/adapter_config.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == want, name


def test_a_kill_after_the_last_step_resumes_there_without_evaluating_the_base_again(inputs, shared, monkeypatch):
    reference = shared / "last-reference"
    assert train(inputs, reference).returncode == 0
    run_dir = shared / "last"
    killed = train(inputs, run_dir, fail_at=STEPS - 1)  # the final step is done, the evaluation is not
    assert killed.returncode == KILLED_EXIT_CODE
    assert checkpoint_step(run_dir / "checkpoint" / "checkpoint.pt") == STEPS

    starts, evaluations = [], []
    resume, evaluate = Trainer.resume, Trainer.evaluate
    monkeypatch.setattr(Trainer, "resume", lambda self, *a: _record(starts, resume(self, *a)))
    monkeypatch.setattr(Trainer, "evaluate", lambda self: evaluations.append(1) or evaluate(self))
    assert main(["train", *inputs, f"hydra.run.dir={run_dir}"]) == 0
    assert starts == [STEPS], starts
    assert len(evaluations) == 1  # only the tuned model was evaluated
    ours, theirs = result(run_dir), result(reference)
    assert ours["status"] == "ok", ours["reason"]
    assert ours["metrics"] == theirs["metrics"], (ours["metrics"], theirs["metrics"])
    assert json.loads((run_dir / "predictions.json").read_text()) == json.loads((reference / "predictions.json").read_text())


def _record(starts: list, progress):
    starts.append(progress.step)
    return progress


# ------------------------------------------------------------------ 5. disks and permissions
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
unprivileged_child = pytest.mark.skipif(
    not can_drop_privileges(), reason="mode bits bind only a process without root's DAC override: this test "
    "needs root to start one (as nobody, or root without CAP_DAC_OVERRIDE), and a non-root user cannot remove "
    "its own write permission on a folder it may chmod back (the test could not prove the refusal)")


@unprivileged_child
def test_a_run_dir_that_cannot_be_written_is_one_line(inputs, shared):
    parent = shared / "readonly-parent"
    parent.mkdir()
    parent.chmod(0o555)  # nobody cannot create the run dir (nor Hydra its log file) in it
    run_dir = parent / "run"
    done = train(inputs, run_dir, user="nobody", cwd=shared, home=shared)
    assert done.returncode == 2, done.stderr[-3000:]
    no_traceback(done)
    (line,) = errors(done.stderr)
    assert str(parent / "run") in line and "Permission denied" in line, line


@unprivileged_child
def test_a_run_dir_made_read_only_mid_run_is_one_line_and_keeps_the_last_checkpoint(inputs, shared):
    run_dir = shared / "readonly-midrun"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    hook = (  # as an operator's chmod would, right after the checkpoint of step 2, before step 4's
        "import sys, os; from peftlab.training.trainer import Trainer; from peftlab.cli import main\n"
        "save = Trainer.save_checkpoint\n"
        "def patched(self, progress, *a):\n"
        "    if progress.step == 4:\n"
        "        for p in (self.run_dir, self.run_dir / 'checkpoint'): os.chmod(p, 0o555)\n"
        "    return save(self, progress, *a)\n"
        "Trainer.save_checkpoint = patched\n"
        "sys.exit(main(sys.argv[1:]))\n")
    argv = [sys.executable, "-c", hook, *command(inputs, run_dir)[3:]]
    done = subprocess.run(argv, cwd=shared, capture_output=True, text=True, timeout=300,
                          env=environment(home=shared), preexec_fn=unprivileged)
    run_dir.chmod(0o777)
    assert done.returncode == 2, done.stderr[-3000:]
    no_traceback(done)
    (line,) = errors(done.stderr)
    checkpoint = run_dir / "checkpoint" / "checkpoint.pt"
    assert line.startswith(f"error: {checkpoint}: [Errno 13] Permission denied"), line
    assert "result.json not written either" in line
    assert checkpoint_step(checkpoint) == 2  # the last good checkpoint is intact


@requires_root
def test_a_full_disk_says_no_space_left_and_keeps_the_last_checkpoint(inputs, shared):
    mount = shared / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir = mount / "run"
        # 12 MB per full checkpoint (the tiny BERT with AdamW state): the first fits in 20 MB, the second does not
        done = train(inputs, run_dir, "method=full", "trainer.checkpoint_every=1", "trainer.save_adapter=false",
                     cwd=shared)
        assert done.returncode == 2, done.stderr[-3000:]
        no_traceback(done)
        (line,) = errors(done.stderr)
        assert "[Errno 28] No space left on device" in line and "unexpected pos" not in line, line
        assert str(run_dir / "checkpoint" / "checkpoint.pt") in line, line
        checkpoint = run_dir / "checkpoint" / "checkpoint.pt"
        assert checkpoint_step(checkpoint) >= 1  # the last good checkpoint loads
    finally:
        subprocess.run(["umount", str(mount)])
