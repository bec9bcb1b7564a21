"""``peftlab analyze PATH... [--base MODEL] [--out DIR] [--compare OTHER]``.

PATH is a peftlab run directory (``result.json``, ``config.yaml``, ``adapter/``),
rebuilt with :func:`peftlab.reporting.runs.load_run`, or a LoRA adapter saved by HF peft
(``adapter_config.json`` + ``adapter_model.safetensors``), whose factors are
read straight from the safetensors file — no base model needed for spectra::

    key   base_model.model.<module>.lora_A.weight  (r, in)     A
          base_model.model.<module>.lora_B.weight  (out, r)    B
    ΔW = s · B A,   s = α / r  (α / √r with use_rslora),  r and α per module from
    rank_pattern / alpha_pattern (matched as peft does: the pattern is a suffix of the module name)

W0 (needed only for the amplification table) comes from the run's wrapped
layers, or for a peft adapter from ``--base`` via ``peftlab.models.loading.load_base``.

Writes to ``--out``: spectra.csv, ranks.csv, summary.json, amplification.csv,
similarity_*.csv and PNG plots. Bad input gives one ``error: PATH: ...`` line
and exit status 2; a run of a method without a weight delta gives one
``not applicable: ...`` line and is skipped (status 0).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from peftlab.analysis.amplification import amplification_table
from peftlab.analysis.report import analyze_layers, write_report, write_similarity
from peftlab.analysis.similarity import compare_runs
from peftlab.analysis.spectra import as_update, is_factored

PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)
NEITHER = ("neither a peftlab run (result.json) nor a PEFT adapter "
           "(adapter_config.json + adapter_model.safetensors)")


class InputError(Exception):
    """Bad input; the CLI prints ``error: <where>: <message>`` and returns 2."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where


class NotApplicable(Exception):
    """The run has nothing to analyze (no weight delta); the CLI prints a line and skips it."""


@dataclass
class Source:
    """One analyzable input: module name -> layer or (B, A), and how to get W0 for them."""

    path: Path
    run: str
    method: str
    updates: dict[str, Any]
    base_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# HF peft adapters
# --------------------------------------------------------------------------- #
def is_peft_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches a dotted suffix of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """s = α / r, or α / √r with use_rslora; α and r honour alpha_pattern / rank_pattern."""
    expected = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if expected != rank:
        raise InputError(f"{module}: lora_A has rank {rank} but adapter_config.json says r={expected}")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def read_peft_config(path: Path) -> dict:
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read adapter_config.json ({err})") from err
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"peft_type {peft_type!r} is not supported; allowed: LORA")
    if config.get("use_dora"):
        raise InputError("DoRA adapters are not supported from a peft file (their update depends on W0)")
    return config


def read_peft_factors(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Module name -> (s·B, A) in fp32 with ΔW = (s·B) @ A of shape (out, in), and the adapter config.

    Embedding LoRA (lora_embedding_A (r, num), lora_embedding_B (dim, r)) becomes
    (s·Aᵀ, Bᵀ): ΔW in the embedding's (num, dim) weight layout.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_peft_config(path)
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise InputError(f"cannot read adapter_model.safetensors ({err})") from err
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if match and tensor.ndim == 2:
            parts.setdefault(match["module"], {})[match["role"]] = tensor.float()
    factors = {}
    for module, roles in parts.items():
        if {"lora_A", "lora_B"} <= roles.keys():
            a, b = roles["lora_A"], roles["lora_B"]
            factors[module] = (b * lora_scale(config, module, a.shape[0]), a)
        elif {"lora_embedding_A", "lora_embedding_B"} <= roles.keys():
            a, b = roles["lora_embedding_A"], roles["lora_embedding_B"]
            factors[module] = (a.T * lora_scale(config, module, a.shape[0]), b.T)
        else:
            raise InputError(f"{module}: has {sorted(roles)} but not both LoRA factors")
    if not factors:
        raise InputError("adapter_model.safetensors holds no LoRA factors (lora_A / lora_B)")
    return factors, config


def load_base_weights(base: str, modules: list[str]) -> dict[str, torch.Tensor]:
    """W0 (out, in, fp32) of ``modules`` from the base model ``base`` (via peftlab.models.loading.load_base)."""
    from peftlab.methods.base import base_weight

    try:
        from peftlab.models.loading import load_base
    except ImportError as err:
        raise NotApplicable(f"amplification skipped: cannot load a base model ({err})") from err
    try:
        loaded = load_base(base)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load base model: {err}") from err
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"load_base returned {type(model).__name__}, not a model")
    weights = {}
    for name in modules:
        module = find_module(model, name)
        if module is not None:
            weights[name] = base_weight(module)
    return weights


def find_module(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """``model.get_submodule(name)``, retrying without leading components (``model.layers.0`` on a
    LlamaModel whose own names start at ``layers.0``); None if absent."""
    parts = name.split(".")
    for start in range(len(parts)):
        try:
            return model.get_submodule(".".join(parts[start:]))
        except AttributeError:
            continue
    return None


def peft_source(path: Path, base: str | None) -> Source:
    factors, config = read_peft_factors(path)
    method = "rslora" if config.get("use_rslora") else "lora"
    weights = (lambda: load_base_weights(base, list(factors))) if base else None
    return Source(path, path.resolve().name, method, factors, weights)


# --------------------------------------------------------------------------- #
# peftlab runs
# --------------------------------------------------------------------------- #
def is_run(path: Path) -> bool:
    return (path / "result.json").is_file()


def run_source(path: Path) -> Source:
    """A peftlab run rebuilt by ``peftlab.reporting.runs.load_run``; NotApplicable without a weight delta."""
    try:
        from peftlab.reporting.runs import load_run
    except ImportError as err:
        raise InputError(f"cannot load peftlab runs ({err})") from err
    _check_finished(path)
    try:
        model, method, result = load_run(path)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load run: {err}") from err
    name = (result.get("method") or {}).get("name") or getattr(method, "name", "?")
    if not getattr(method, "has_weight_delta", True):
        raise NotApplicable(f"method '{name}' has no weight delta (spectra need one)")
    try:
        updates = dict(method.delta_weights(model))
    except ValueError as err:
        raise InputError(f"cannot read the run's weight deltas: {err}") from err
    return Source(path, path.resolve().name, name, updates, lambda: run_base_weights(updates))


def _check_finished(path: Path) -> None:
    """A run that did not finish saved no adapter: say so with its status and reason."""
    try:
        result = json.loads((path / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_run reports an unreadable result.json
    status = result.get("status")
    if status != "ok" and not (path / "adapter").is_dir():
        reason = str(result.get("reason") or "no reason recorded").splitlines()[0][:200]
        raise InputError(f"run status is {status!r} ({reason}); it saved no adapter")


def run_base_weights(updates: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """W0 of wrapped layers (``layer.base``); layers without one are left out."""
    from peftlab.methods.base import base_weight

    return {n: base_weight(layer.base) for n, layer in updates.items() if hasattr(layer, "base")}


def load_source(path_text: str, base: str | None) -> Source:
    path = Path(path_text)
    if not path.exists():
        raise InputError("no such file or directory")
    if path.name == "adapter" and is_run(path.parent):  # a run's adapter/ folder: analyze the run
        path = path.parent
    if is_run(path):
        return run_source(path)
    if is_peft_adapter(path):
        return peft_source(path, base)
    raise InputError(NEITHER)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab analyze",
        description="Spectra, ranks, amplification and subspace similarity of learned updates ΔW.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="peftlab run directory or HF peft LoRA adapter")
    parser.add_argument("--base", help="base model (config name or path) for a peft adapter's amplification")
    parser.add_argument("--out", default="peftlab-analysis", help="output directory (default: %(default)s)")
    parser.add_argument("--method-names", nargs="+", metavar="NAME",
                        help="method label per PATH (give it after the PATHs)")
    parser.add_argument("--compare", metavar="OTHER", help="run or adapter to compare subspaces with (φ heatmaps)")
    parser.add_argument("--dense-method", choices=("full", "randomized"), default="full",
                        help="SVD of dense updates (default: %(default)s)")
    parser.add_argument("--k", type=int, help="number of singular values for --dense-method randomized")
    parser.add_argument("--amp-rank", type=int, help="r for amplification (default: the adapter's rank)")
    parser.add_argument("--no-amplification", action="store_true", help="skip the amplification table")
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    parser.add_argument("--max-heatmaps", type=int, default=12, help="per-module φ heatmaps (default: %(default)s)")
    parser.add_argument("--logger", choices=("none", "wandb"), default="none",
                        help="wandb: also log the tables and plots to a W&B run (job_type=analysis)")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline",
                        help="W&B mode for --logger wandb (default: %(default)s, no login needed)")
    return parser


def analyze_main(argv: list[str]) -> int:
    """Entry point of ``peftlab analyze``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and the error line
        return int(exit_.code or 0)
    if args.method_names and len(args.method_names) != len(args.paths):
        return _error("--method-names", f"got {len(args.method_names)} names for {len(args.paths)} paths")
    sources = []
    for index, path in enumerate(args.paths):
        try:
            source = load_source(path, args.base)
        except NotApplicable as why:
            print(f"not applicable: {path}: {why}")
            continue
        except InputError as err:
            return _error(path, str(err))
        if args.method_names:
            source.method = args.method_names[index]
        sources.append(source)
    if not sources:
        return 0
    _unique_run_labels(sources)
    out = Path(args.out)
    if args.compare and (status := _compare(sources, args, out)) != 0:
        return status
    try:
        _analyze(sources, args, out)
    except InputError as err:
        return _error(err.where or f"--base {args.base}", str(err))
    if args.logger == "wandb":
        log_to_wandb(out, [s.run for s in sources], args.wandb_mode)
    return 0


def log_to_wandb(out: Path, runs: list[str], mode: str) -> None:
    """Every CSV table and PNG plot in ``out`` to one W&B run (job_type=analysis)."""
    import wandb

    run = wandb.init(project="peftlab", job_type="analysis", mode=mode, dir=str(out),
                     name=f"analysis-{'+'.join(runs)}"[:120], config={"runs": runs})
    for table in sorted(out.glob("*.csv")):
        run.log({table.stem: wandb.Table(dataframe=pd.read_csv(table))})
    for image in sorted(out.glob("*.png")):
        run.log({image.stem: wandb.Image(str(image))})
    run.finish()


def _error(where: str, message: str) -> int:
    print(f"error: {where}: {message}", file=sys.stderr)
    return 2


def _unique_run_labels(sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        count = seen.get(source.run, 0)
        seen[source.run] = count + 1
        if count:
            source.run = f"{source.run}-{count + 1}"


def _compare(sources: list[Source], args: argparse.Namespace, out: Path) -> int:
    """φ grids of every PATH against --compare OTHER; 2 when no module names match."""
    try:
        other = load_source(args.compare, args.base)
    except NotApplicable as why:
        print(f"not applicable: {args.compare}: {why}")
        return 0
    except InputError as err:
        return _error(args.compare, str(err))
    for source in sources:
        try:
            grids = compare_runs(source.updates, other.updates)
        except ValueError as err:
            return _error(f"{source.path} vs {args.compare}", str(err))
        write_similarity(out, grids, source.run, other.run, plots=not args.no_plots, max_heatmaps=args.max_heatmaps)
        mean_phi = sum(float(g[-1, -1]) for g in grids.values()) / len(grids)
        print(f"{source.path} vs {args.compare}: {len(grids)} matching modules, mean φ at full rank {mean_phi:.3f}")
    return 0


def _analyze(sources: list[Source], args: argparse.Namespace, out: Path) -> None:
    spectra, ranks, summaries, amplification = [], [], [], []
    for source in sources:
        try:
            s, r, summary = analyze_layers(source.updates.items(), source.run, source.method, args.dense_method, args.k)
        except ValueError as err:  # a diverged run's NaN update, a bad --k
            raise InputError(str(err), where=str(source.path)) from err
        spectra.append(s)
        ranks.append(r)
        summaries.append(summary)
        if not args.no_amplification:
            amplification += _amplification_rows(source, args.amp_rank)
        mean = summary.get("effective_rank", {}).get("mean")
        print(f"{source.path}: {summary['n_modules']} modules ({source.method}), "
              f"mean effective rank {mean if mean is None else round(mean, 3)} -> {out}")
    write_report(out, pd.concat(spectra, ignore_index=True), pd.concat(ranks, ignore_index=True),
                 {"runs": summaries}, plots=not args.no_plots)
    if amplification:
        pd.DataFrame(amplification).to_csv(out / "amplification.csv", index=False)


def _amplification_rows(source: Source, rank: int | None) -> list[dict]:
    """Amplification rows for one source, or [] with a printed reason when W0 is unavailable."""
    if source.base_weights is None:
        print(f"{source.path}: amplification skipped (a peft adapter needs --base MODEL for W0)")
        return []
    try:
        weights = source.base_weights()
    except NotApplicable as why:
        print(f"{source.path}: {why}")
        return []
    updates = {n: u for n, u in source.updates.items() if rank is not None or is_factored(as_update(u))}
    if len(updates) < len(source.updates):
        print(f"{source.path}: amplification skipped for dense updates (pass --amp-rank R)")
    try:
        rows = amplification_table(updates.items(), weights, r=rank)
    except ValueError as err:
        raise InputError(str(err), where="--amp-rank" if rank is not None else str(source.path)) from err
    if len(rows) < len(updates):
        print(f"{source.path}: amplification skipped for {len(updates) - len(rows)} modules without W0")
    return [{"run": source.run, "method": source.method, **row} for row in rows]
