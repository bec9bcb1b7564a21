"""One result per run: result.json (atomic), provenance, and the adapter files.

result.json fields (schema_version 1):
  status            ok | failed | diverged | interrupted (SIGTERM / SIGINT; train.steps = steps completed);
                    reason: why, when not ok
  method            {name, config, summary}   model {name, path, family, kind}   task {name, type, metric}
  seed, config      the resolved Hydra config
  config_hash       sha256 of the config without keys that do not change results (peftlab/training/checkpoint.py)
  params            {trainable (the method's), head (new task head, trained by every method),
                     total (base + adapter), trainable_pct, expected_trainable (closed form)}
  metrics           {before: {validation, test}, after: {validation, test}}   each {metric, loss, n}
  forgetting        probes {before, after, forgetting} when the task declares probes
  train             {steps, epochs, examples, tokens, tokens_per_s, wall_time_s, train_time_s, final_loss, widest_batch_tokens,
                     param_groups: [{name, lr, count}]}
  memory            {kind: rss_peak | cuda_max_memory_allocated, peak_bytes, baseline_bytes}
  data              {source, hash, sizes, duplicates_removed}
  distributed       {world_size, local_world_size, backend}   (torchrun; world_size 1 otherwise)
  provenance        {git_sha, git_dirty, versions, device, torch_threads, python, host, started_at, finished_at}
  adapter           {path, files} or null
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "hydra-core", "safetensors", "accelerate", "datasets", "wandb")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same folder (with the umask's mode, not mkstemp's 0600),
    fsync, then rename over ``path``. An OS error names ``path`` (not the temp file)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def git_state(cwd: Path | None = None) -> dict:
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return {"git_sha": sha.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip()) if sha.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def versions() -> dict:
    found = {"python": platform.python_version(), "peftlab": _version("peftlab")}
    for name in PACKAGES:
        found[name] = _version(name)
    return found


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def provenance(device: torch.device, started_at: str) -> dict:
    return {
        **git_state(),
        "versions": versions(),
        "device": device_description(device),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "command": " ".join(sys.argv),
        "started_at": started_at,
        "finished_at": now(),
    }


def load_result(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no result.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt result.json ({err})") from None
