"""Resumable runs: a config hash, skipping finished runs, and mid-run checkpoints.

    re-run a run dir ─► result.json ok, same config_hash   ─► skip, return the stored result
                     ─► result.json ok, other config_hash  ─► refuse (ConfigError) unless trainer.overwrite=true
                     ─► failed / missing result.json       ─► run; continue from checkpoint/ when it holds
                                                              this config's state, else start at step 0

A checkpoint (``run_dir/checkpoint/checkpoint.pt``, written every
``trainer.checkpoint_every`` steps and after the last step, through a temp file +
``os.replace``; the one before it is kept as ``checkpoint.prev.pt``) holds
everything the next step depends on: the trainable parameters (for ``full``
that is the whole model) and the head, the method's training state beyond
parameters (``Method.train_state``: AdaLoRA's importance EMAs and masks),
optimizer and scheduler state, the RNG states and the run's counters. The
batch stream is replayed from the step count (epoch e is shuffled with
``seed * 1000 + e``), so a resumed run sees the batches an uninterrupted one
would, and ends with the same numbers. It also holds the base model's evaluation
(``metrics.before``, probe values, per-example predictions), so a resumed run does not
evaluate the base again.

Faults (README "Resuming a sweep"):

* an unreadable checkpoint (truncated, random bytes, a pickle ``weights_only`` refuses) is
  renamed ``*.corrupt`` with one ``warning:`` line naming it; the run continues from
  ``checkpoint.prev.pt`` when that one loads, else from step 0, and says which;
* ``run_dir/.peftlab.lock`` (``flock``, held for the whole run, released by the kernel
  when the holder dies, however it dies) keeps a second process out of a live run dir:
  :class:`RunDirInUse`, one line naming the directory and the holder's pid;
* SIGTERM / SIGINT (:class:`SignalGuard`) end the run at the next step boundary with a
  checkpoint, ``status: interrupted`` and exit 128 + signal (143 / 130);
* an OS error writing a checkpoint names the checkpoint's path and the OS's own error
  (``[Errno 28] No space left on device``, not torch's ``unexpected pos``).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from peftlab.config import RunConfig, to_dict, validate
from peftlab.errors import ConfigError
from peftlab.reporting.results import file_mode

FORMAT = "peftlab-checkpoint-v1"
CHECKPOINT_FILE = Path("checkpoint") / "checkpoint.pt"
PREVIOUS_FILE = Path("checkpoint") / "checkpoint.prev.pt"
LOCK_FILE = ".peftlab.lock"
REPLACED_RESULT = "result.replaced.json"  # an ok result of another config that trainer.overwrite replaces
# Keys that do not change what a run computes, left out of the config hash so that a re-run
# with another logger, progress bar, checkpoint interval or thread count still matches.
# threads: the thread count may change float summation order, but it is a property of the
# machine (0 = its cores), not of the experiment.
# ``study`` holds a named sweep's settings, which act through resolved keys (``optim.lr`` from
# ``study.lr``): editing one method's entry must not invalidate every other finished job
HASH_EXCLUDED = ("out_dir", "logger", "study", "trainer.progress", "trainer.threads",
                 "trainer.checkpoint_every", "trainer.overwrite")
# Keys added after runs were committed, left out while they hold the value those runs had: a
# committed run re-run with today's code keeps its hash (is skipped, not refused).
HASH_EXCLUDED_AT_DEFAULT = {"model.pooling": "cls", "trainer.divergence_factor": 100.0,
                            "trainer.divergence_steps": 5, "trainer.divergence_window": 10,
                            "task.options_column": "options", "task.passage_column": None,
                            "task.delimiter": None, "task.encoding": "utf-8",
                            "task.subset": None, "task.revision": None, "task.split_map": {},
                            "task.chat_template": "auto", "task.max_new_tokens": 32, "task.stop": None,
                            "task.answer": "text", "task.completion_column": "completion"}
FAIL_AT_STEP_ENV = "PEFTLAB_FAIL_AT_STEP"
KILLED_EXIT_CODE = 137  # what a shell reports for a process killed with SIGKILL


# ---------------------------------------------------------------------------- config hash
def config_hash(run: RunConfig) -> str:
    """sha256 of the canonical JSON of the validated config, without :data:`HASH_EXCLUDED` (and
    :data:`HASH_EXCLUDED_AT_DEFAULT` at their defaults)."""
    values = to_dict(run)
    for dotted in HASH_EXCLUDED:
        group, _, key = dotted.partition(".")
        if key:
            values[group].pop(key, None)
        else:
            values.pop(group, None)
    for dotted, default in HASH_EXCLUDED_AT_DEFAULT.items():
        group, _, key = dotted.partition(".")
        if values.get(group, {}).get(key) == default:
            values[group].pop(key)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def stored_result(run_dir: Path) -> dict | None:
    """run_dir/result.json, or None when it is missing or unreadable."""
    return read_result(run_dir)[0]


def read_result(run_dir: Path) -> tuple[dict | None, str | None]:
    """(result, None), (None, None) when there is no result.json, (None, why) when it is unreadable
    (result.json is written atomically, so that is damage, not a kill mid-write)."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(result, dict):
        return None, f"not a result object (a JSON {type(result).__name__})"
    return result, None


def finished_result(cfg: DictConfig | dict, run_dir: Path) -> dict | None:
    """The stored result when ``run_dir`` already holds an ``ok`` run of this config; else None.

    An ``ok`` result of another config is never overwritten silently: that raises a ConfigError
    unless ``trainer.overwrite=true`` (a sweep whose values changed while its
    ``hydra.sweep.dir`` stayed fixed maps new configs onto old job dirs). A config that does
    not validate raises its own ConfigError here, before the ok result could be replaced.
    """
    previous, unreadable = read_result(run_dir)
    if unreadable is not None:
        run = validate(cfg)
        if run.trainer.overwrite:
            return None
        raise ConfigError(
            "trainer.overwrite",
            f"{Path(run_dir) / 'result.json'} is unreadable ({unreadable}), so it may be another config's result; "
            "allowed: true to replace it, or another hydra.run.dir / hydra.sweep.dir",
        )
    if previous is None or previous.get("status") != "ok":
        return None
    run = validate(cfg)
    wanted = config_hash(run)
    if previous.get("config_hash") == wanted:
        return previous
    if run.trainer.overwrite:
        return None
    old = previous.get("config_hash") or "none recorded"
    raise ConfigError(
        "trainer.overwrite",
        f"{run_dir} holds an ok result of another config (config_hash {old[:12]}, this one {wanted[:12]}); "
        "allowed: true to replace it, or another hydra.run.dir / hydra.sweep.dir",
    )


def set_aside_replaced(run_dir: Path) -> str | None:
    """Before a run writes anything into ``run_dir``: an ok result (of another config, which
    trainer.overwrite let through) or an unreadable result.json is renamed
    ``result.replaced.json`` and that run's adapter/ and predictions.json are removed, so a
    run killed mid-way never leaves an old ok beside new files. Returns what was done."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").exists():
        return None
    previous, unreadable = read_result(run_dir)
    if unreadable is None and (previous or {}).get("status") != "ok":
        return None  # failed / diverged / interrupted: replaced at the end, never read as ok
    os.replace(run_dir / "result.json", run_dir / REPLACED_RESULT)
    (run_dir / "predictions.json").unlink(missing_ok=True)
    adapter = run_dir / "adapter"
    if adapter.is_dir():
        for leftover in adapter.iterdir():
            leftover.unlink()
        adapter.rmdir()
    what = "an unreadable result.json" if unreadable else "the ok result of another config"
    return f"{run_dir}: {what} moved to {REPLACED_RESULT} (trainer.overwrite=true)"


def say(message: str) -> None:
    """One line on the terminal (stderr), whatever logging Hydra configured."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- run dir lock
class RunDirInUse(ConfigError):
    """Another live process holds the run dir's lock."""


class RunLock:
    """``run_dir/.peftlab.lock``: an ``flock`` held while a run uses its directory. The kernel
    drops it when the holder exits, crashes or is killed, so a lock is never stale; the
    file (left in place: unlinking a lock file races with the next taker) names the holder's
    pid and host for the message. Where the file system has no flock, the recorded pid is
    checked instead (stale once that pid is gone)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> tuple[int | None, str]:
        try:
            pid, _, host = self.path.read_text(encoding="utf-8").strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.refuse()
        except OSError as err:  # no flock here (some network file systems): trust a live recorded pid
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            pid, host = self.holder()
            if pid is not None and pid != os.getpid() and host == socket.gethostname() and alive(pid):
                os.close(fd)
                self.refuse()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def refuse(self) -> None:
        pid, host = self.holder()
        who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "another process"
        raise RunDirInUse(str(self.run_dir), f"in use by {who} (lock {self.path}); allowed: wait for it to end, "
                          "or another hydra.run.dir / hydra.sweep.dir")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- signals
class Interrupted(BaseException):
    """SIGTERM / SIGINT ended the run (a BaseException, like KeyboardInterrupt: no handler for
    ordinary errors swallows it). ``step``: the optimizer steps completed."""

    def __init__(self, signum: int, step: int | None = None):
        self.signum = signum
        self.step = step
        super().__init__(f"{self.signal_name} at step {step}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports: 130 for SIGINT, 143 for SIGTERM


class SignalGuard:
    """Turns SIGTERM and SIGINT into :class:`Interrupted` while a run is in progress.

    Inside the training loop (``deferring``) the first signal is only noted: the loop ends
    the step it is in, writes a checkpoint and raises (so a re-run resumes right there);
    elsewhere, or at a second signal, it raises at once. Installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.pending: int | None = None
        self.deferring = False
        self.previous: dict = {}

    def handle(self, signum, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Counters of a run after ``step`` completed optimizer steps."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    examples: int = 0
    loss: float = float("nan")
    train_time_s: float = 0.0
    widest: int = 0              # tokens per sequence of the widest batch so far
    early_loss_sum: float = 0.0  # divergence rule: the losses of the first trainer.divergence_window steps
    early_loss_count: int = 0
    above: int = 0               # consecutive steps since then with a loss above factor × their mean


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_parameters(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``params``; names and shapes must match exactly."""
    if set(params) != set(tensors):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensors[name].shape)} != {tuple(p.shape)}")
            p.copy_(tensors[name])


class Checkpointer:
    """Saves and finds the checkpoint of one run dir; ``key`` (config hash + data hash) says
    which run a checkpoint belongs to, so one of another config is never restored."""

    def __init__(self, run_dir: Path, key: str, every: int, writes: bool = True):
        self.writes = writes  # torchrun ranks > 0 read rank 0's checkpoint and leave its files alone
        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.previous = Path(run_dir) / PREVIOUS_FILE
        self.key = key
        self.every = every

    def due(self, completed: int, total_steps: int) -> bool:
        """Checkpoint after every ``every`` completed steps and after the last one (a kill during
        the final evaluation then resumes there, not at the checkpoint before)."""
        return self.every > 0 and (completed % self.every == 0 or completed == total_steps)

    def save(self, progress: Progress, state: dict) -> None:
        """Write ``state`` + progress atomically: temp file in the same folder, fsync, rename;
        the checkpoint it replaces becomes checkpoint.prev.pt. An OS error names the checkpoint
        and says what the OS said (torch's writer would report ``unexpected pos`` instead)."""
        payload = {"format": FORMAT, "key": self.key, "progress": asdict(progress),
                   "rng": rng_state(), **state}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            os.fchmod(fd, file_mode())  # the umask's mode, as for every other file (mkstemp: 0600)
            with os.fdopen(fd, "wb") as handle:
                writer = _Writer(handle)
                try:
                    torch.save(payload, writer)
                except RuntimeError:
                    if writer.error is not None:
                        raise writer.error from None
                    raise
                handle.flush()
                os.fsync(handle.fileno())
            if self.path.exists():
                os.replace(self.path, self.previous)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as err:
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def load(self) -> tuple[Progress, dict] | None:
        """(progress, state) of this run's checkpoint, or of the one before it when the newest
        does not load (renamed ``*.corrupt``, one warning line naming it); None when neither
        loads (the run starts at step 0, and says so), and None (files removed) for another
        run's checkpoint."""
        damaged = []
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            handle = path.open("rb")  # an OS error opening it (permissions) is the OS's, and says so
            try:
                payload = torch.load(handle, map_location="cpu", weights_only=True)
                if not isinstance(payload, dict) or not isinstance(payload.get("progress"), dict):
                    raise ValueError(f"not a peftlab checkpoint (a {type(payload).__name__})")
            except Exception as err:  # truncated (torch's reader: RuntimeError or EINVAL), random bytes, a pickle
                handle.close()        # that weights_only refuses, ...
                first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
                damaged.append(path)
                if not self.writes:
                    continue
                os.replace(path, path.with_name(path.name + ".corrupt"))
                say(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {first}); "
                    f"kept as {path.name}.corrupt")
                continue
            handle.close()
            if payload.get("format") != FORMAT or payload.get("key") != self.key:
                if self.writes:
                    self.remove()
                return None
            progress = Progress(**payload.pop("progress"))
            if damaged and self.writes:
                say(f"warning: {self.path.parent.parent}: resuming from {path} at step {progress.step}")
            return progress, payload
        if damaged and self.writes:
            say(f"warning: {self.path.parent.parent}: no readable checkpoint left; restarting from step 0")
        return None

    def remove(self) -> None:
        """Delete the checkpoint folder (a finished run keeps no large files, nor damaged ones)."""
        if self.path.parent.exists():
            for leftover in self.path.parent.iterdir():
                leftover.unlink()
            self.path.parent.rmdir()


class _Writer:
    """The file torch.save writes to, remembering the OSError its C++ writer turns into
    ``unexpected pos`` (a full disk)."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def simulated_crash(step: int) -> None:
    """Test hook: ``PEFTLAB_FAIL_AT_STEP=N`` ends the process right after step N (0-based) is
    logged and checkpointed, with ``os._exit`` as a kill would: no result.json, no clean-up."""
    if os.environ.get(FAIL_AT_STEP_ENV) == str(step):
        os._exit(KILLED_EXIT_CODE)


__all__ = ["Checkpointer", "Interrupted", "Progress", "RunDirInUse", "RunLock", "SignalGuard", "config_hash",
           "finished_result", "load_parameters", "read_result", "set_aside_replaced", "set_rng_state",
           "simulated_crash", "stored_result"]
