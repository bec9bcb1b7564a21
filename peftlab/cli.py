"""The ``peftlab`` command.

    peftlab train [overrides]        one run            (Hydra: method=lora method.r=16 ...)
    peftlab train -m [overrides]     a multirun sweep   (method=lora,dora seed=0,1,2)
    peftlab demo [overrides]         the demo run (conf/experiment/demo.yaml)
    peftlab analyze PATH... [opts]   spectra / ranks / similarity of runs or peft adapters
    peftlab estimate [overrides]     memory estimate before a run
    peftlab table DIR... [opts]      paper-style table of runs / sweeps (--by KEYS --metric NAME
                                     --format md|csv|latex --out FILE --select-lr)
    peftlab paired RUN... [--base R] paired test of each run against the base model on the same
                                     test examples (McNemar p, 95% interval of Δ accuracy)

    torchrun --nproc_per_node=N -m peftlab.cli train [overrides]   one run, data-parallel over N processes

Bad input prints one line, ``error: <key>: <what is allowed>``, and exits 2; so does an OS
error (``error: <path>: [Errno 28] No space left on device``) and a run dir in use by another
process. SIGTERM / SIGINT print ``interrupted: <run dir> ...`` and exit 143 / 130.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from peftlab.errors import ConfigError  # noqa: E402

GROUPS = ("model", "task", "method", "optim", "trainer", "logger")
USAGE = __doc__
# torchrun ranks > 0: Hydra creates no run folder, saves no .hydra/ configs and opens no log file
QUIET_HYDRA = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none"]


def fail(message: str, code: int = 2) -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; rank 0 says it once
        print(f"error: {message}", file=sys.stderr)
    return code


# OS errors that stop a whole sweep (every later job would meet them too)
SWEEP_STOPPING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def os_error_line(err: OSError) -> str:
    """``<path>: [Errno N] <what the OS said>`` (and whether result.json could not be written)."""
    where = f"{err.filename}: " if err.filename else ""
    line = f"{where}[Errno {err.errno}] {err.strerror}"
    unrecorded = getattr(err, "unrecorded", None)
    return line + (f" (result.json not written either: {unrecorded})" if unrecorded else "")


def check_overrides(overrides: list[str]) -> list[str]:
    """Catch bad group choices and bad keys before Hydra starts, with one line each.

    Returns the overrides to hand to Hydra: a key that the group's schema has but
    its YAML does not state (``task.path``) gets Hydra's '+' prefix added.
    """
    from peftlab.config import CONF_DIR, compose, validate

    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in GROUPS and value and not any(c in value for c in "*()[]"):
            for choice in value.split(","):  # a sweep lists several
                if not (CONF_DIR / key / f"{choice}.yaml").exists():
                    options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
                    raise ConfigError(key, f"unknown {key} {choice!r}; allowed: {', '.join(options)}")
    if any("," in o.partition("=")[2] for o in overrides if not o.startswith("hydra")):
        return add_unstated_keys(overrides)  # sweep values: each job is validated when it runs
    try:
        cfg = compose(overrides)
    except Exception as err:  # Hydra's own composition errors
        text = str(err)
        bad = next((o for o in overrides if "=" in o and f"'{o.lstrip('+~').partition('=')[0]}'" in text), None)
        key = bad.lstrip("+~").partition("=")[0] if bad else "overrides"
        if bad is None or bad.startswith("+") or "Could not override" not in text:
            raise ConfigError(key, text.splitlines()[0]) from None
        # a key the YAML does not state: add it with '+'; the group's schema then accepts it or
        # names the allowed keys
        overrides = [("+" + o if o == bad else o) for o in overrides]
        return check_overrides(overrides)
    validate(cfg)
    return overrides


def add_unstated_keys(overrides: list[str]) -> list[str]:
    """For a sweep: give Hydra's '+' to ``group.key=value`` overrides whose key the chosen group YAML
    does not state (``task.path`` of a task YAML without one), which a single run gets from
    :func:`check_overrides` retrying; the group choices are composed once to see what they state."""
    from peftlab.config import compose

    choices = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in GROUPS and value:
            choices.append(f"{key}={value.split(',')[0]}")  # the first job's choice: each states the same keys
    try:
        cfg = compose(choices)
    except Exception:  # noqa: BLE001 - a bad choice is reported when the job runs
        return overrides
    out = []
    for override in overrides:
        group, _, field = override.partition("=")[0].partition(".")
        if not override.startswith(("+", "~")) and group in GROUPS and field and "." not in field \
                and field not in cfg.get(group, {}):
            override = "+" + override
        out.append(override)
    return out


def unwritable_output(overrides: list[str], multirun: bool) -> str | None:
    """One line when the run dir (sweep dir) Hydra is about to create, or its nearest existing
    parent, cannot be written: Hydra would fail in os.makedirs or its log-file handler with a
    traceback before peftlab runs. None when it can (or the dir cannot be resolved here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from peftlab.config import CONF_DIR

    plain = [o for o in overrides if "," not in o.partition("=")[2]]  # sweep values: the dir rarely depends on them
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=plain, return_hydra_config=True)
        target = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except Exception:
        return None
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return None
    why = "not a directory" if not existing.is_dir() else "not writable"
    return f"{target}: [Errno {errno.EACCES if existing.is_dir() else errno.ENOTDIR}] " + (
        "Permission denied" if existing.is_dir() else "Not a directory") + f" ({existing} is {why})"


def train_main(argv: list[str], experiment: str | None = None) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peftlab.training import distributed
    from peftlab.training.checkpoint import Interrupted, finished_result
    from peftlab.config import CONF_DIR
    from peftlab.training.tracking import sweep_group
    from peftlab.training.trainer import describe, run

    multirun = "-m" in argv or "--multirun" in argv
    ranks = distributed.from_env()
    if multirun and ranks.active:
        return fail("--multirun: not under torchrun (every rank would run its own sweep); "
                    "allowed: one run per torchrun launch, or a sweep without torchrun")
    overrides = [a for a in argv if not a.startswith("-")]
    if experiment:
        overrides = [f"+experiment={experiment}"] + overrides
    try:
        overrides = check_overrides(overrides)
    except ConfigError as err:
        return fail(str(err))
    if not ranks.is_main:
        overrides += QUIET_HYDRA
    else:
        problem = unwritable_output(overrides, multirun)
        if problem:
            return fail(problem)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _job(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
        if sweeping and cfg.logger.get("group") is None:  # one sweep, one W&B group (recorded in result.json)
            cfg.logger.group = sweep_group(HydraConfig.get().sweep.dir)
        try:
            if finished_result(cfg, run_dir) is not None:  # a re-run sweep: this job is done
                print(f"skip: {run_dir} (ok, same config)")
                return
            result = run(cfg, run_dir)
        except Interrupted as err:  # SIGTERM / SIGINT: result.json says interrupted; the sweep stops too
            print(f"interrupted: {run_dir} at step {err.step} ({err.signal_name}); re-run the same command to resume",
                  file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None
        except OSError as err:
            if err.errno is None:  # not the OS's: e.g. a model that cannot be loaded
                if not sweeping:
                    raise
                print(f"error: {err} ({run_dir})", file=sys.stderr)
                return
            if sweeping and err.errno not in SWEEP_STOPPING_ERRNOS:
                print(f"error: {os_error_line(err)} ({run_dir})", file=sys.stderr)
                return
            raise SystemExit(fail(os_error_line(err))) from None
        except ConfigError as err:
            # one bad job must not stop a sweep; its result.json says failed (a refused one keeps its ok result)
            if sweeping:
                print(f"error: {err} ({run_dir})", file=sys.stderr)
                return
            raise SystemExit(fail(str(err)))
        except Exception:  # a crash in one sweep job is recorded (result.json: failed) and the sweep goes on
            if not sweeping:
                raise
            import traceback

            traceback.print_exc()
            print(f"error: job failed, see {run_dir / 'result.json'}", file=sys.stderr)
            return
        if ranks.is_main:
            print(describe(result))

    sys.argv = ["peftlab"] + ([a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")])
    sys.argv += (["--multirun"] if multirun else []) + overrides
    try:
        _job()
    except KeyboardInterrupt:  # SIGINT while Hydra starts, before a run installed its handlers
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        distributed.teardown()
    return 0


def table_parser() -> argparse.ArgumentParser:
    import argparse

    from peftlab.reporting.table import FORMATS

    parser = argparse.ArgumentParser(prog="peftlab table", description="One row per configuration, aggregated over seeds.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (searched recursively for result.json)")
    parser.add_argument("--by", metavar="KEYS", help="comma-separated dotted config keys that make a row "
                        "(default: method.name + every key that differs between runs)")
    parser.add_argument("--metric", metavar="NAME", help="metric to report (default: the task's), e.g. loss, "
                        "perplexity, forgetting, forgetting.<probe>")
    parser.add_argument("--format", choices=FORMATS, help="default: from --out's suffix (.csv, .tex), else md")
    parser.add_argument("--out", metavar="FILE", help="also write the table here")
    parser.add_argument("--select-lr", action="store_true",
                        help="per configuration keep the optim.lr with the best mean validation metric")
    return parser


def table_main(argv: list[str]) -> int:
    """``peftlab table``: prints the table (and writes --out); bad input is one line, exit 2."""
    from peftlab.reporting.table import build_table

    try:
        args = table_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse printed usage and the error (or --help)
        return int(exit_.code or 0)
    fmt = args.format or {".csv": "csv", ".tex": "latex"}.get(Path(args.out or "").suffix, "md")
    by = [key.strip() for key in args.by.split(",") if key.strip()] if args.by else None
    try:
        text = build_table(args.dirs, by=by, metric=args.metric, select_lr=args.select_lr).render(fmt)
    except ConfigError as err:
        return fail(str(err))
    print(text.rstrip("\n"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return 0


def demo_main(argv: list[str]) -> int:
    """``peftlab demo``: the demo sweep (conf/experiment/demo.yaml), one job per core, then its
    comparison table and the spectra of LoRA's ΔW (``peftlab analyze``)."""
    from peftlab.analysis.cli import analyze_main
    from peftlab.reporting.table import build_table
    from peftlab.training.trainer import available_cores

    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={available_cores()}"]
    code = train_main(["-m", *launcher, *argv], experiment="demo")
    if code:
        return code
    sweep = Path(next((a.partition("=")[2] for a in argv if a.startswith("hydra.sweep.dir=")), "runs/demo"))
    try:
        table = build_table([sweep])
    except ConfigError as err:
        return fail(str(err))
    print("\n" + table.render("md"))
    lora = sweep / "lora"
    if (lora / "adapter").is_dir():
        analyze_main([str(lora), "--out", str(sweep / "analysis"), "--max-heatmaps", "0"])
        print(f"\ntable: {sweep / 'table.md'}   spectra of LoRA's ΔW: {sweep / 'analysis'}/*.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "demo":
        return demo_main(rest)
    if command == "analyze":
        from peftlab.analysis.cli import analyze_main

        return analyze_main(rest)
    if command == "estimate":
        from peftlab.memory.cli import estimate_main
        from peftlab.training.measure import measure_for_estimate

        return estimate_main(rest, measure=measure_for_estimate)
    if command == "table":
        return table_main(rest)
    if command == "paired":
        from peftlab.analysis.paired import paired_main

        return paired_main(rest)
    return fail(f"unknown command {command!r}; allowed: train, demo, analyze, estimate, table, paired")


if __name__ == "__main__":
    sys.exit(main())
