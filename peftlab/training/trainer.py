"""One training loop for every method.

    config ─► validate ─► method = METHODS[name](cfg)       (bad input stops here, before any loading)
           ─► data splits ─► base model ─► task
           ─► evaluate base (validation, test)
           ─► method.apply(model) ─► optimizer over method.param_groups(...) + head
           ─► loop: loss = task.loss + method.extra_loss ; (non-finite / divergence rule) ; backward ;
                    method.after_backward ; clip ; step ; schedule ; checkpoint every N steps and after the last
           ─► evaluate tuned ─► adapter/ + result.json

A run dir that already holds an ``ok`` result of the same config is skipped; a
failed, interrupted or killed run continues from its last checkpoint, which also
holds the base evaluation (peftlab/training/checkpoint.py). The run holds the run
dir's lock throughout, and SIGTERM / SIGINT end it as ``interrupted``.

Divergence: a loss that is not finite, or one above ``trainer.divergence_factor`` × the
early mean loss (of the first ``trainer.divergence_window`` steps, leaving out losses already
above it) for ``trainer.divergence_steps`` steps in a row, ends the run ``diverged`` at that step,
before it is applied (``train.steps``: the steps completed). ``divergence_factor=0``
turns the second rule off.

The loop knows methods only through their hooks, so every method runs
through exactly this code: same data order, schedule, clipping and
evaluation for all. Under torchrun each rank trains on its slice of every
global batch and the gradients are averaged before ``after_backward``; rank 0
evaluates and writes (peftlab/training/distributed.py).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from peftlab.training import distributed
from peftlab.training.budget import match_budget
from peftlab.training.checkpoint import (Checkpointer, Interrupted, Progress, RunLock, SignalGuard, config_hash,
                                         finished_result, load_parameters, say, set_aside_replaced, set_rng_state,
                                         simulated_crash)
from peftlab.config import RunConfig, to_dict, validate
from peftlab.errors import ConfigError
from peftlab.memory.measure import PeakMemory
from peftlab.methods import method_class
from peftlab.methods.base import count, logical_numel
from peftlab.models.loading import load_model
from peftlab.training.optim import build_optimizer, build_scheduler
from peftlab.reporting.results import SCHEMA_VERSION, now, provenance, write_json_atomic
from peftlab.tasks import build_task, head_outputs, load_splits
from peftlab.tasks.probes import build_probes, evaluate_probes, forgetting_report
from peftlab.tasks.base import count_tokens, to_device
from peftlab.training.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)
HEAD_PREFIX = "__head__."


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int, processes: int = 1) -> int:
    """torch threads = the cores this process may use, shared by the ``processes`` torchrun started
    on this machine (oversubscription makes CPU runs much slower)."""
    if threads <= 0:
        threads = max(1, available_cores() // processes)
    torch.set_num_threads(threads)
    return threads


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda requested but no CUDA device is available; allowed: auto, cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.method = method_class(cfg.method.name)(cfg.method)  # validates the method's values
        self.config_hash = config_hash(cfg)
        self.dist, self.device = distributed.setup(pick_device(cfg.trainer.device))
        self.autocast = autocast_for(cfg.trainer.precision, self.device)
        self.budget = None  # the BudgetMatch, when cfg.budget sizes the method
        self.signals: SignalGuard | None = None  # set by run(): SIGTERM / SIGINT end the loop at a step boundary
        self.found = None        # (progress, state) of this config's checkpoint, read in setup()
        self.evaluation = None   # the base evaluation, stored with every checkpoint
        self.completed = 0       # optimizer steps completed so far

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.threads = set_threads(cfg.trainer.threads, self.dist.local_world_size)
        seed_everything(cfg.seed)
        splits, facts = load_splits(cfg.task)
        self.model, self.tokenizer, self.arch = load_model(cfg.model, cfg.task.type, head_outputs(cfg.task, splits))
        self.task = build_task(cfg.task, self.tokenizer, self.arch, splits, facts)
        # a checkpoint fits this config on this data (a data file may change under the same config)
        key = f"{self.config_hash}/{facts['hash']}"
        self.checkpoints = Checkpointer(self.run_dir, key, cfg.trainer.checkpoint_every, writes=self.dist.is_main)
        self.found = self.checkpoints.load()
        self.probes = build_probes(cfg.task.probes, self.tokenizer, self.arch, cfg.task)
        if cfg.budget:  # size the method to the trainable-parameter budget (peftlab/training/budget.py)
            self.method, self.budget = match_budget(self.method, self.model, self.arch, cfg.budget)
            cfg.method = self.method.config
        self.method.check(self.model, self.arch)  # bad targets / ranks stop here, before any evaluation
        if cfg.trainer.gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ConfigError("trainer.gradient_checkpointing", f"{self.arch.name} does not support it; allowed: false")
            if self.method.checkpointing_conflict:
                raise ConfigError("trainer.gradient_checkpointing",
                                  f"{self.method.name}: {self.method.checkpointing_conflict}; allowed: false")
        self.model.to(self.device)
        self.total_parameters_base = sum(p.numel() for p in self.model.parameters())

    def evaluate(self) -> dict:
        """Task metrics on validation and test (under torchrun: computed by rank 0, returned on every rank)."""
        batch_size = self.cfg.trainer.eval_batch_size
        return self.dist.main_only(lambda: {
            split: self.task.evaluate(self.model, split, batch_size, self.device, self.autocast)
            for split in ("validation", "test")})

    def evaluate_probes(self) -> dict[str, float]:
        return self.dist.main_only(lambda: evaluate_probes(self.model, self.probes, self.device, self.autocast,
                                                           self.cfg.trainer.eval_batch_size))

    def apply_method(self) -> None:
        seed_everything(self.cfg.seed)  # adapter init depends on the seed only
        self.method.apply(self.model, self.arch)
        self.model.to(self.device)
        names = set(self.arch.head_parameters)
        self.head = {n: p for n, p in self.model.named_parameters() if n in names}
        for p in self.head.values():
            p.requires_grad_(True)
        self.own = self.method.trainable_parameters(self.model)
        self.dist.broadcast_parameters([*self.own.values(), *self.head.values()])
        self.dist.seed_dropout(self.cfg.seed)
        if self.cfg.trainer.gradient_checkpointing:  # checked in setup(), before any evaluation
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def parameter_counts(self) -> dict:
        trainable = count(self.own)
        head = count(self.head)
        total = sum(logical_numel(p) for p in self.model.parameters())  # QLoRA packs 2 weights per byte
        return {
            "trainable": trainable,
            "head": head,
            "total": total,
            "base_total": self.total_parameters_base,
            "trainable_pct": 100.0 * trainable / self.total_parameters_base,
            "expected_trainable": self.method.expected_trainable(self.model),
        }

    # ------------------------------------------------------------------- train
    def total_steps(self) -> int:
        t = self.cfg.trainer
        if t.max_steps > 0:
            return t.max_steps
        per_epoch = self.task.num_train_batches(t.batch_size) / t.grad_accum
        return max(1, math.ceil(t.epochs * per_epoch))

    def batches(self, skip: int = 0):
        """Endless stream of training batches; epoch e is shuffled with seed * 1000 + e.

        The first ``skip`` batches are passed over (a resumed run), whole epochs without reading them.
        """
        batch_size = self.cfg.trainer.batch_size
        epoch, skip = divmod(skip, self.task.num_train_batches(batch_size)) if skip else (0, 0)
        while True:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            for batch in itertools.islice(self.task.train_batches(batch_size, generator), skip, None):
                yield epoch, batch
            skip = 0
            epoch += 1

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The method's parameters and the task head's, by name: what a checkpoint holds."""
        return {**self.own, **{HEAD_PREFIX + n: p for n, p in self.head.items()}}

    def resume(self, optimizer, scheduler, tracker: Tracker) -> Progress:
        """Restore this config's checkpoint when run_dir has one (else start at step 0), and cut
        metrics.jsonl to the rows before the step training continues from."""
        found, self.found = self.found, None
        progress = Progress()
        if found is not None:
            progress, state = found
            load_parameters(self.trainable(), state["parameters"])
            self.method.load_train_state(self.model, state["method"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            log.info("%s: resuming at step %d", self.run_dir, progress.step)
        tracker.rewind(progress.step)
        return progress

    def save_checkpoint(self, progress: Progress, optimizer, scheduler) -> None:
        self.checkpoints.save(progress, {
            "parameters": {n: p.detach().cpu() for n, p in self.trainable().items()},
            "method": self.method.train_state(self.model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "evaluation": self.evaluation,
        })

    def divergence(self, step: int, loss: float, progress: Progress) -> str | None:
        """The divergence rule beyond non-finite losses (see the module docstring). The reference
        is the running mean of the first ``divergence_window`` losses, each checked against the
        mean before it: a loss above ``factor`` × that mean counts towards the streak and is left
        out (a loss that explodes at step 1 does not raise its own reference). The running state
        lives in ``progress`` (checkpointed: a resumed run judges as an uninterrupted one)."""
        t = self.cfg.trainer
        if t.divergence_factor <= 0:
            return None
        if progress.early_loss_count == 0:
            progress.early_loss_sum, progress.early_loss_count = loss, 1
            return None
        mean = progress.early_loss_sum / progress.early_loss_count
        if mean <= 0 or loss <= t.divergence_factor * mean:
            progress.above = 0
            if progress.early_loss_count < t.divergence_window:
                progress.early_loss_sum += loss
                progress.early_loss_count += 1
            return None
        progress.above += 1
        if progress.above < t.divergence_steps:
            return None
        return (f"loss {loss:.4g} at step {step}: above {t.divergence_factor:g} x the early mean loss "
                f"({mean:.4g}, of the first {progress.early_loss_count} steps) for {t.divergence_steps} steps in a row "
                "(trainer.divergence_factor=0 turns this rule off)")

    def fit(self, tracker: Tracker) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        total_steps = self.total_steps()
        groups = self.method.param_groups(self.model, cfg.optim.lr, cfg.optim.weight_decay)
        optimizer = build_optimizer(cfg.optim, groups, list(self.head.values()))
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
        self.method.on_train_start(self.model, total_steps)
        progress = self.resume(optimizer, scheduler, tracker)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        self.model.train()
        memory = PeakMemory(self.device)
        memory.start(resident=[*self.model.parameters(), *self.model.buffers()])
        stream = self.batches(skip=progress.step * t.grad_accum)
        tokens, examples, epoch, loss_value = progress.tokens, progress.examples, progress.epoch, progress.loss
        status, reason = "ok", None
        widest = progress.widest  # tokens per sequence of the widest batch (padded to its longest example)
        start = time.perf_counter() - progress.train_time_s
        bar = tqdm(range(progress.step, total_steps), initial=progress.step, total=total_steps,
                   desc=f"{cfg.method.name}", disable=not (t.progress and self.dist.is_main), dynamic_ncols=True)
        watch = Progress(early_loss_sum=progress.early_loss_sum, early_loss_count=progress.early_loss_count,
                         above=progress.above)
        self.completed = completed = progress.step
        if self.signals is not None:
            self.signals.deferring = True  # a signal now ends the step in progress first
        for step in bar:
            step_loss = 0.0
            extra_value = 0.0
            for _ in range(t.grad_accum):
                epoch, batch = next(stream)  # the global batch; this rank trains on its shard
                shard, share = self.dist.shard(batch, self.task.loss_units)  # (batch, 1.0) in one process
                with self.autocast():
                    loss = self.task.loss(self.model, to_device(shard, self.device)) * share / t.grad_accum
                extra = self.method.extra_loss(self.model)
                if extra is not None:
                    extra = extra / t.grad_accum
                    extra_value += float(extra.detach())
                    loss = loss + extra
                loss.backward()
                step_loss += float(loss.detach())
                tokens += count_tokens(batch)
                examples += batch["input_ids"].shape[0]
                widest = max(widest, int(batch["input_ids"].shape[-1]))
            loss_value = self.dist.sync_gradients(params, step_loss)  # mean over ranks (grads and loss)
            if not math.isfinite(loss_value):
                status, reason = "diverged", f"loss became {loss_value} at step {step}"
                break
            why = self.divergence(step, loss_value, watch)
            if why is not None:
                status, reason = "diverged", why
                break
            self.method.after_backward(self.model, step)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.completed = completed = step + 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
            if step % t.log_every == 0 or step == total_steps - 1:
                row = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "extra_loss": extra_value,
                       "tokens": tokens, "tokens_per_s": tokens / elapsed, "epoch": epoch, "elapsed_s": elapsed}
                try:
                    tracker.log(step, row)
                except OSError as err:  # a full disk / read-only dir: name the file
                    raise OSError(err.errno, err.strerror or str(err), str(tracker.path)) from None
            signalled = self.signals is not None and self.signals.pending is not None
            checkpoint = self.checkpoints.due(completed, total_steps) or (signalled and t.checkpoint_every > 0)
            if self.dist.is_main and checkpoint:
                done = Progress(completed, epoch, tokens, examples, loss_value, time.perf_counter() - start, widest,
                                watch.early_loss_sum, watch.early_loss_count, watch.above)
                self.save_checkpoint(done, optimizer, scheduler)
            simulated_crash(step)
            if signalled:
                bar.close()
                raise Interrupted(self.signals.pending, completed)
        if self.signals is not None:
            self.signals.deferring = False
        bar.close()
        train_time = time.perf_counter() - start
        return {
            "status": status,
            "reason": reason,
            "train": {
                "steps": completed,  # a diverged run stops before applying the step that diverged
                "planned_steps": total_steps,
                "epochs": examples / max(1, len(self.task.encoded["train"])),
                "examples": examples,
                "tokens": tokens,
                "tokens_per_s": tokens / train_time if train_time > 0 else None,
                "train_time_s": train_time,
                "final_loss": loss_value,
                "widest_batch_tokens": widest,
                "param_groups": [{"name": g.get("name", str(i)), "lr": g["initial_lr"], "count": count(g["params"])}
                                 for i, g in enumerate(optimizer.param_groups)],
            },
            "memory": memory.report(),
        }

    # -------------------------------------------------------------------- save
    def save_adapter(self) -> dict:
        folder = self.run_dir / "adapter"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = dict(self.method.state_dict(self.model))
        tensors.update({HEAD_PREFIX + n: p.detach().cpu().contiguous() for n, p in self.head.items()})
        save_file(tensors, folder / "adapter.safetensors")
        config = {
            "format": "peftlab-adapter-v1",
            "method": self.cfg.method.name,
            "method_config": asdict(self.cfg.method),
            "model": asdict(self.cfg.model),
            "task": {"name": self.cfg.task.name, "type": self.cfg.task.type},
            "head_parameters": sorted(self.head),
            "summary": self.method.summary(self.model),
        }
        write_json_atomic(folder / "adapter_config.json", config)
        return {"path": "adapter", "files": ["adapter.safetensors", "adapter_config.json"]}


def run(cfg: DictConfig | dict, run_dir: Path) -> dict:
    """Run one configuration end to end; always leaves a result.json in ``run_dir``.

    A ConfigError (bad input) is recorded as ``failed`` and re-raised before
    anything trains; any other exception is recorded as ``failed`` and re-raised;
    SIGTERM / SIGINT are recorded as ``interrupted`` (checkpoint kept) and re-raised
    as :class:`Interrupted`. Under torchrun every rank calls this and only rank 0
    writes (``run_dir``, result.json, adapter/, metrics.jsonl, W&B, checkpoints).
    The writing process holds ``run_dir``'s lock for the whole run: a second one
    stops with :class:`RunDirInUse` before it reads or writes anything. A run dir
    that holds an ``ok`` result of this config is not run again: its stored result
    is returned (and one of another config, or an unreadable result.json, raises a
    ConfigError unless ``trainer.overwrite``; see peftlab/training/checkpoint.py).
    """
    run_dir = Path(run_dir)
    writes = distributed.from_env().is_main
    lock = RunLock(run_dir).acquire() if writes else None
    try:
        with SignalGuard() as signals:
            return _run(cfg, run_dir, writes, signals)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig | dict, run_dir: Path, writes: bool, signals: SignalGuard) -> dict:
    finished = finished_result(cfg, run_dir)
    if finished is not None:
        log.info("skip: %s (ok, same config)", run_dir)
        return finished
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        replaced = set_aside_replaced(run_dir)  # before anything new is written (a kill leaves no old ok)
        if replaced:
            say(replaced)
    started = now()
    wall_start = time.perf_counter()
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    result: dict = {"schema_version": SCHEMA_VERSION, "status": "failed", "reason": "did not finish", "run_dir": str(run_dir),
                    "config": raw, "seed": raw.get("seed")}
    tracker = None
    trainer = None
    try:
        if writes:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(raw)), encoding="utf-8")
        run_cfg = validate(cfg)
        result["config"] = to_dict(run_cfg)
        result["config_hash"] = config_hash(run_cfg)
        result["method"] = {"name": run_cfg.method.name, "config": asdict(run_cfg.method)}
        result["task"] = {"name": run_cfg.task.name, "type": run_cfg.task.type, "metric": run_cfg.task.metric}
        trainer = Trainer(run_cfg, run_dir)
        trainer.signals = signals
        trainer.setup()
        result["distributed"] = trainer.dist.describe()
        if trainer.budget is not None:  # setup chose the method's size: record it and the config that really runs
            result.update(budget=trainer.budget.to_dict(), config=to_dict(run_cfg))
            result["method"]["config"] = asdict(run_cfg.method)
        arch = trainer.arch
        result["model"] = {"name": arch.name, "path": arch.path, "family": arch.family, "kind": arch.kind}
        result["data"] = trainer.task.facts
        result["task"]["metric"] = trainer.task.metric_name
        stored = (trainer.found[1].get("evaluation") if trainer.found is not None else None) or None
        if stored is not None:  # the checkpoint holds the base evaluation: not repeated
            before, probes_before, per_example = stored["before"], stored["probes_before"], stored["per_example"]
        else:
            per_example: dict = {}  # predictions.json: what each evaluation predicted per example (classification)
            before = take_predictions(trainer.evaluate(), per_example, "before") if run_cfg.trainer.eval_before else None
            probes_before = trainer.evaluate_probes() if run_cfg.trainer.eval_before else None
        trainer.evaluation = plain({"before": before, "probes_before": probes_before, "per_example": per_example})
        trainer.apply_method()
        result["params"] = trainer.parameter_counts()
        tracker = Tracker(run_cfg.logger, run_dir, result["config"], name=run_dir.name) if writes else NullTracker()
        outcome = trainer.fit(tracker)
        result.update(outcome)
        result["memory"]["estimate"] = estimate_for(run_cfg, trainer.device, trainer.dist.world_size)
        after = take_predictions(trainer.evaluate(), per_example, "after") if outcome["status"] == "ok" else None
        if writes and per_example:
            names = {"labels": [str(label) for label in run_cfg.task.labels]} if run_cfg.task.labels else {}
            write_json_atomic(run_dir / "predictions.json", {"format": "peftlab-predictions-v1", **names, **per_example})
        result["metrics"] = {"before": before, "after": after}
        if trainer.probes and probes_before is not None and after is not None:
            result["forgetting"] = forgetting_report(trainer.probes, probes_before, trainer.evaluate_probes())
        result["method"]["summary"] = trainer.method.summary(trainer.model)
        saving = writes and run_cfg.trainer.save_adapter and outcome["status"] == "ok"
        result["adapter"] = trainer.save_adapter() if saving else None
        tracker.summary(summary_line(result))
        result["provenance"] = provenance(trainer.device, started)
    except BaseException as err:  # recorded, then re-raised for the caller
        if isinstance(err, KeyboardInterrupt):  # SIGINT before the guard was installed / outside the main thread
            err = Interrupted(2)
        if isinstance(err, Interrupted):
            if err.step is None:
                err.step = trainer.completed if trainer is not None else 0
            result["status"] = "interrupted"
            kept = trainer is not None and trainer.checkpoints.path.exists()
            result["reason"] = f"{err.signal_name} at step {err.step}" + (
                "; checkpoint kept, a re-run resumes from it" if kept else "; no checkpoint, a re-run starts at step 0")
            result.setdefault("train", {})["steps"] = err.step
        else:
            result["status"] = "failed"
            result["reason"] = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        result.setdefault("provenance", provenance(torch.device("cpu"), started))
        result["wall_time_s"] = time.perf_counter() - wall_start
        if writes:
            try:
                write_json_atomic(run_dir / "result.json", result)
            except OSError as second:  # a full disk / read-only dir: the first error is the one to report
                err.unrecorded = str(second)
        if err is not sys.exc_info()[1]:
            raise err from None
        raise
    finally:
        if tracker is not None:
            tracker.finish()
    result["wall_time_s"] = time.perf_counter() - wall_start
    if writes:
        write_json_atomic(run_dir / "result.json", result)
        trainer.checkpoints.remove()  # finished (ok or diverged): a re-run has nothing to continue
    return result


def plain(value):
    """``value`` as JSON types (numpy / torch scalars become floats), which a weights_only checkpoint loads."""
    import json

    from peftlab.reporting.results import _default

    return json.loads(json.dumps(value, default=_default))


def take_predictions(metrics: dict, per_example: dict, when: str) -> dict:
    """Move the per-example lists a task returns (``predictions``, ``references``) out of each
    split's metrics into ``per_example`` (``{"references": {split: [...]}, when: {split: [...]}}``),
    so result.json keeps scalars and predictions.json holds what a paired test needs."""
    for split, values in metrics.items():
        if "predictions" in values:
            per_example.setdefault(when, {})[split] = values.pop("predictions")
            per_example.setdefault("references", {})[split] = values.pop("references")
    return metrics


def estimate_for(cfg: RunConfig, device: torch.device, world_size: int = 1) -> dict:
    """``peftlab estimate`` for one rank of this run (its share of the global batch), stored beside
    the measured peak (never fails the run)."""
    from peftlab.memory.estimate import estimate

    preset_or_path = cfg.model.name if cfg.model.source == "package" else cfg.model.path
    batch = math.ceil(cfg.trainer.batch_size / world_size)
    try:
        # the facts of this run, as `peftlab estimate` assumes them (peftlab/memory/cli.py): its task's
        # loss, and batches padded to their longest example when they hold several (a batch of one never is)
        est = estimate(
            preset_or_path, cfg.method.name, asdict(cfg.method), batch_size=batch,
            seq_len=cfg.task.max_length, precision=cfg.trainer.precision,
            gradient_checkpointing=cfg.trainer.gradient_checkpointing, optimizer=cfg.optim.name,
            weights_dtype=cfg.model.dtype, device=device.type, task=cfg.task.type, padded=batch > 1,
        )
    except Exception as err:  # an estimate is a convenience: say why it is missing
        return {"error": f"{type(err).__name__}: {err}"}
    return est.to_dict()


def written_files(run_dir: Path, result: dict) -> list[str]:
    """What the run left in its folder, for the printout (the adapter only when it was saved)."""
    names = ["result.json"] + [n for n in ("metrics.jsonl", "predictions.json") if (run_dir / n).exists()]
    return names + (["adapter/"] if result.get("adapter") else [])


def summary_line(result: dict) -> dict:
    """The headline numbers of a run (W&B summary, CLI printout)."""
    metric = result["task"]["metric"]
    metrics = result.get("metrics") or {}
    pick = lambda when: ((metrics.get(when) or {}).get("test") or {}).get(metric)  # noqa: E731
    return {
        "status": result["status"],
        "method": result["method"]["name"],
        f"test_{metric}_before": pick("before"),
        f"test_{metric}_after": pick("after"),
        "trainable": (result.get("params") or {}).get("trainable"),
        "train_time_s": (result.get("train") or {}).get("train_time_s"),
    }


def describe(result: dict) -> str:
    s = summary_line(result)
    metric = result["task"]["metric"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"status      {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""),
        f"model       {result['model']['name']}   task {result['task']['name']}   method {s['method']}",
        f"test {metric:<7} {fmt(s[f'test_{metric}_before'])} (base) -> {fmt(s[f'test_{metric}_after'])} (tuned)",
        f"trainable   {s['trainable']:,} params of {result['params']['base_total']:,} "
        f"({result['params']['trainable_pct']:.3f}%) + head {result['params']['head']:,}",
        f"time        {result['train']['train_time_s']:.1f} s training, {result['wall_time_s']:.1f} s wall, "
        f"{result['train']['tokens_per_s']:.0f} tokens/s, peak {result['memory']['peak_bytes'] / 2**20:.0f} MiB "
        f"({result['memory']['kind']})",
        f"files       {result['run_dir']}/" + ", ".join(written_files(Path(result["run_dir"]), result)),
    ]
    return "\n".join(lines)


__all__ = ["Trainer", "run", "describe", "summary_line"]
