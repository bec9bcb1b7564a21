"""Resumable runs: a config hash, skipping finished runs, and mid-run checkpoints.

    re-run a run dir ─► result.json ok, same config_hash   ─► skip, return the stored result
                     ─► result.json ok, other config_hash  ─► refuse (ConfigError) unless trainer.overwrite=true
                     ─► failed / missing result.json       ─► run; continue from checkpoint/ when it holds
                                                              this config's state, else start at step 0

A checkpoint (``run_dir/checkpoint/checkpoint.pt``, written every
``trainer.checkpoint_every`` steps through a temp file + ``os.replace``) holds
everything the next step depends on: the trainable parameters (for ``full``
that is the whole model) and the head, the method's training state beyond
parameters (``Method.train_state``: AdaLoRA's importance EMAs and masks),
optimizer and scheduler state, the RNG states and the run's counters. The
batch stream is replayed from the step count (epoch e is shuffled with
``seed * 1000 + e``), so a resumed run sees the batches an uninterrupted one
would, and ends with the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from peftlab.config import RunConfig, to_dict, validate
from peftlab.errors import ConfigError

FORMAT = "peftlab-checkpoint-v1"
CHECKPOINT_FILE = Path("checkpoint") / "checkpoint.pt"
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
HASH_EXCLUDED_AT_DEFAULT = {"model.pooling": "cls"}
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
    """run_dir/result.json, or None when it is missing or unreadable (a run killed mid-write)."""
    try:
        return json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def finished_result(cfg: DictConfig | dict, run_dir: Path) -> dict | None:
    """The stored result when ``run_dir`` already holds an ``ok`` run of this config; else None.

    An ``ok`` result of another config is never overwritten silently: that raises a ConfigError
    unless ``trainer.overwrite=true`` (a sweep whose values changed while its
    ``hydra.sweep.dir`` stayed fixed maps new configs onto old job dirs). A config that does
    not validate raises its own ConfigError here, before the ok result could be replaced.
    """
    previous = stored_result(run_dir)
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

    def __init__(self, run_dir: Path, key: str, every: int):
        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.key = key
        self.every = every

    def due(self, completed: int, total_steps: int) -> bool:
        """Checkpoint after every ``every`` completed steps, except the last (the result follows it)."""
        return self.every > 0 and completed % self.every == 0 and completed < total_steps

    def save(self, progress: Progress, state: dict) -> None:
        """Write ``state`` + progress atomically: temp file in the same folder, fsync, rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "key": self.key, "progress": asdict(progress),
                   "rng": rng_state(), **state}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> tuple[Progress, dict] | None:
        """(progress, state) of this run's checkpoint; None (and the file removed) for another run's."""
        if not self.path.exists():
            return None
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT or payload.get("key") != self.key:
            self.remove()
            return None
        return Progress(**payload.pop("progress")), payload

    def remove(self) -> None:
        """Delete the checkpoint folder (a finished run keeps no large files)."""
        if self.path.parent.exists():
            for leftover in self.path.parent.iterdir():
                leftover.unlink()
            self.path.parent.rmdir()


def simulated_crash(step: int) -> None:
    """Test hook: ``PEFTLAB_FAIL_AT_STEP=N`` ends the process right after step N (0-based) is
    logged and checkpointed, with ``os._exit`` as a kill would: no result.json, no clean-up."""
    if os.environ.get(FAIL_AT_STEP_ENV) == str(step):
        os._exit(KILLED_EXIT_CODE)


__all__ = ["Checkpointer", "Progress", "config_hash", "finished_result", "load_parameters", "set_rng_state",
           "simulated_crash", "stored_result"]
