"""Find the runs under folders: finished ones (result.json) and the missing jobs of sweeps.

    DIR/**/result.json                        -> Run (ok | failed | diverged), one per run
    DIR/**/.hydra/ without a result.json      -> Run (missing: the job started, never finished)
    DIR/**/multirun.yaml, job numbers absent  -> Run (missing: the job never started)

A sweep directory holds Hydra's ``multirun.yaml`` (its config, and in
``hydra.overrides.task`` the sweep, e.g. ``method=lora,dora seed=0,1,2``) and one
directory per job with ``.hydra/hydra.yaml`` (``hydra.job.num``). The jobs a sweep
should have are the cartesian product of its swept values, numbered as Hydra's
basic sweeper numbers them; a number that no job directory holds never started.

Reads json and yaml only (Hydra's override parser for sweeps): no torch.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from peftlab.errors import ConfigError


@dataclass
class Run:
    """One run as a table sees it."""

    path: Path
    status: str                 # ok | failed | diverged | missing
    reason: str | None
    config: dict[str, Any]      # flattened: {"method.r": 8, "method.targets": ("q", "v"), ...}
    result: dict = field(default_factory=dict)  # result.json; {} for a missing run


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"method": {"r": 8, "targets": ["q"]}}`` -> ``{"method.r": 8, "method.targets": ("q",)}``.

    Lists become tuples so values can key a row; empty dicts (``rank_pattern: {}``) vanish.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def read_run(path: Path) -> Run:
    """A result.json -> Run; an unreadable file is bad input (ConfigError naming it)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(str(path), f"cannot read result.json ({err})") from None
    if not isinstance(result, dict) or "status" not in result:
        raise ConfigError(str(path), "not a peftlab result.json (it has no status)")
    return Run(path.parent, result["status"], result.get("reason"), flatten(result.get("config") or {}), result)


def collect_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run under each DIR (recursively): one per result.json, then the missing jobs."""
    runs: list[Run] = []
    seen: set[tuple[Path, str | None]] = set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise ConfigError(str(folder), "not a directory; allowed: run or sweep directories of peftlab train")
        found = [read_run(path) for path in sorted(folder.rglob("result.json"))]
        if not found:
            raise ConfigError(str(folder), "no result.json under it; allowed: run or sweep directories of peftlab train")
        for run in found + missing_runs(folder):
            ident = (run.path.resolve(), run.reason if run.status == "missing" else None)
            if ident not in seen:  # DIRs may overlap
                seen.add(ident)
                runs.append(run)
    return runs


def missing_runs(folder: Path) -> list[Run]:
    """Jobs without a result.json: Hydra job directories (``.hydra/``) whose run never finished,
    and, in each sweep (``multirun.yaml``), the job numbers its overrides expand to that no
    job directory holds."""
    job_dirs = sorted({path.parent for path in folder.rglob(".hydra") if path.is_dir()})
    runs = [Run(job, "missing", f"{job.name} started, no result.json", flatten(_job_dir_config(job)))
            for job in job_dirs if not (job / "result.json").exists()]
    for manifest in sorted(folder.rglob("multirun.yaml")):
        runs += never_started(manifest.parent, [job for job in job_dirs if manifest.parent in job.parents])
    return runs


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _job_dir_config(job: Path) -> dict:
    """The resolved config the run wrote first thing, else Hydra's copy."""
    config = _read_yaml(job / "config.yaml") or _read_yaml(job / ".hydra" / "config.yaml")
    config.pop("hydra", None)
    return config


def _job_number(job: Path) -> int | None:
    number = ((_read_yaml(job / ".hydra" / "hydra.yaml").get("hydra") or {}).get("job") or {}).get("num")
    return number if isinstance(number, int) else None


def never_started(sweep_dir: Path, job_dirs: list[Path]) -> list[Run]:
    manifest = _read_yaml(sweep_dir / "multirun.yaml")
    jobs = sweep_jobs(manifest.get("hydra") or {})
    if jobs is None:
        return []
    started = {_job_number(job) for job in job_dirs}
    base = {key: value for key, value in manifest.items() if key != "hydra"}
    return [Run(sweep_dir, "missing", f"job {number} never started ({' '.join(choices)})",
                flatten(job_config(base, choices)))
            for number, choices in enumerate(jobs) if number not in started]


def sweep_jobs(hydra: dict) -> list[list[str]] | None:
    """Each job's swept choices (``["method=dora", "seed=1"]``), in job-number order, as Hydra's
    basic sweeper expands them (cartesian product, first override outermost); None when that
    cannot be known (another sweeper, or a sweep such as glob() that needs the config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments += list((hydra.get("overrides") or {}).get("task") or [])
    choices: dict[str, list[str]] = {}
    try:
        for override in OverridesParser.create().parse_overrides(arguments):
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices.pop(key, None)  # fixed: already in multirun.yaml's config
            elif override.is_discrete_sweep():
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                return None
    except Exception:  # Hydra's grammar and sweep errors have no common base class
        return None
    return [list(job) for job in itertools.product(*choices.values())]


def job_config(base: dict, choices: list[str]) -> dict:
    """The config a sweep job runs with: multirun.yaml's (which already holds the fixed
    overrides) with the job's swept choices applied; a config-group choice (``method=dora``)
    replaces that group with its YAML from conf/."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from peftlab.config import CONF_DIR

    config = OmegaConf.create(base)
    for override in OverridesParser.create().parse_overrides(choices):
        key, value = override.key_or_group, override.value()
        group_file = CONF_DIR / key / f"{value}.yaml"
        if isinstance(base.get(key), dict) and isinstance(value, str) and group_file.is_file():
            config[key] = OmegaConf.load(group_file)
        elif not override.is_delete():
            OmegaConf.update(config, key, value, force_add=True)
    try:  # a study's ``optim.lr: ${study.lr.${method.name}}`` shows its value, as in the jobs that ran
        return OmegaConf.to_container(config, resolve=True)
    except Exception:  # an interpolation only Hydra can resolve (${hydra:...}): keep it as written
        return OmegaConf.to_container(config)


