"""``peftlab estimate [overrides] [--json] [--measure]``: will this run fit, before running it.

Overrides use the training config's keys (a small key=value parser for now; the Hydra
composition can replace :func:`parse_overrides` without touching the rest)::

    peftlab estimate model=llama-2-7b method=qlora trainer.batch_size=4 task.max_length=2048 \\
        trainer.precision=bf16 trainer.gradient_checkpointing=true
    peftlab estimate model=hf model.path=/data/Llama-3.2-1B method=lora method.r=16 \\
        method.targets=all-linear --json
    peftlab estimate model=llama-2-7b mode=inference trainer.precision=bf16 task.max_length=2048 trainer.batch_size=1

Keys read (everything else in a known group is accepted and ignored, as it does not change memory):

    model                 a preset (peftlab/models/presets/*.json), 'hf' with model.path, or a config path
    model.path, model.dtype (float32 | bfloat16: the stored base; default = trainer.precision)
    method, method.<key>  any method key; method.base_quant (none|nf4|fp4|int8), method.double_quant
    trainer.batch_size, trainer.precision (fp32|bf16|fp16), trainer.gradient_checkpointing,
    trainer.device (cuda|cpu|auto), task.max_length, optim.name (adamw|adamw8bit), mode (train|inference)
    task (a conf/task/*.yaml name) or task.type (lm | classification): the loss over every position, or one
    estimate.kv_cache_len, estimate.attention (auto|sdpa|math|eager), estimate.overhead_gb,
    estimate.master_weights, estimate.padded (batches carry padding), estimate.cpu_heap_slack
    (false when glibc returns freed tensors to the OS: MALLOC_MMAP_THRESHOLD_=131072)

What is not given is what ``peftlab train`` with the same overrides would run (:func:`run_defaults`):
conf/config.yaml's groups (model minilm, task sentiment, method lora, trainer default, optim adamw),
the task's ``type`` and ``max_length`` from conf/task/<task>.yaml, the trainer's batch size,
precision, checkpointing and device from conf/trainer/<trainer>.yaml, and the stored base's dtype
from conf/model/<model>.yaml where the model has one (``float32`` for minilm, smollm2-135m and hf:
``trainer.precision=bf16`` is then autocast, as in training; presets without a conf file store the
base in the compute dtype).

Padding (``estimate.padded``, default ``auto``): peftlab pads every batch to its longest example and
passes the attention mask (peftlab/tasks/base.py ``pad``); transformers then gives SDPA the mask and
repeats grouped-query K/V, unless no row is padded. ``auto`` assumes a batch of several examples is
padded (sentiment snippets vary in length; lm texts are cut into pieces of max_length but each text's
last piece is shorter) and a batch of one is not. Where every example is longer than max_length
(truncated classification texts, lm pieces all cut from long texts) no batch is padded: pass
``estimate.padded=false`` (the padded estimate is the larger one, so ``auto`` errs on the safe side).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Callable

import yaml

from peftlab.errors import ConfigError
from peftlab.memory.estimate import GB, GiB, PARTS, Estimate, estimate
from peftlab.paths import CONF_DIR

# Keys the estimate reads, by where ``peftlab train`` takes their defaults from (run_defaults).
RUN_KEYS = {
    "task": ("type", "max_length"),
    "trainer": ("batch_size", "precision", "gradient_checkpointing", "device"),
    "optim": ("name",),
    "model": ("dtype",),
}


def _conf(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _choices() -> dict[str, str]:
    """{group: option} of conf/config.yaml's defaults list (model minilm, task sentiment, ...)."""
    out = {}
    for entry in _conf(CONF_DIR / "config.yaml").get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out


def run_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """What ``peftlab train`` composes for the keys the estimate reads, given these overrides:
    the groups of conf/config.yaml, then each chosen group's own file (conf/<group>/<option>.yaml).
    A model without a conf file (an architecture preset, llama-2-7b) keeps no ``model.dtype``."""
    choices = {**_choices(), **{g: str(values[g]) for g in ("model", "method", "task", "trainer", "optim")
                                if values.get(g) is not None}}
    out: dict[str, Any] = {"model": choices.get("model", "minilm"), "method": choices.get("method", "lora"),
                           "task": choices.get("task", "sentiment"), "mode": "train"}
    for group, keys in RUN_KEYS.items():
        path = CONF_DIR / group / f"{choices.get(group)}.yaml"
        if not path.is_file():
            if group == "task":  # peftlab train could not compose it either
                allowed = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
                raise ConfigError("task", f"unknown task {choices.get(group)!r}; allowed: {', '.join(allowed)} "
                                  "(a task of one's own: task.source=csv|jsonl, task.path=..., task.type=...)")
            continue
        conf = _conf(path)
        out.update({f"{group}.{key}": conf[key] for key in keys if key in conf})
    return out


DEFAULTS: dict[str, Any] = run_defaults({})  # peftlab train's defaults: model minilm, task sentiment, method lora
GROUPS = ("model", "method", "task", "trainer", "optim", "logger", "experiment", "estimate", "hydra",
          "mode", "seed", "out_dir")


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``key=value`` tokens -> {key: value}; values are read as YAML (``[q,v]``, ``true``, ``16``)."""
    values: dict[str, Any] = {}
    for token in tokens:
        key, sep, raw = token.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigError(token, "expected key=value (e.g. trainer.batch_size=8)")
        if key.split(".")[0] not in GROUPS:
            raise ConfigError(key, f"unknown key; allowed groups: {', '.join(GROUPS)}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        values[key] = value
    return values


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(key, f"got {value!r}; allowed: true, false")


def build_estimate(values: dict[str, Any], device_hint: str | None = None) -> Estimate:
    """Call :func:`peftlab.memory.estimate.estimate` with the values of parsed overrides."""
    v = {**run_defaults(values), **values}
    model = v["model"]
    if model == "hf" or "model.path" in v:
        model = v.get("model.path")
        if not model:
            raise ConfigError("model.path", "model=hf needs model.path=<config.json or model directory>")
    method = v["method"]
    method_cfg = {k.split(".", 1)[1]: val for k, val in v.items() if k.startswith("method.")}
    # base_quant / double_quant are the estimator's own keys (a PEFT method over a quantized base),
    # unless the method has a setting of that name (QLoRA's double_quant), which then stays its own
    own = _method_fields(method)
    base_quant = None if "base_quant" in own else method_cfg.pop("base_quant", None)
    double_quant = None if "double_quant" in own else method_cfg.pop("double_quant", None)
    device = v.get("estimate.device") or v["trainer.device"]
    if device == "auto":
        device = device_hint or "cuda"  # planning for a GPU unless told otherwise
    overhead_gb = v.get("estimate.overhead_gb")
    if overhead_gb is not None and (not isinstance(overhead_gb, (int, float)) or overhead_gb < 0):
        raise ConfigError("estimate.overhead_gb", f"got {overhead_gb!r}; allowed: a number >= 0 (GiB)")
    return estimate(
        str(model), method, method_cfg,
        batch_size=v["trainer.batch_size"], seq_len=v["task.max_length"],
        precision=str(v["trainer.precision"]),
        gradient_checkpointing=_bool("trainer.gradient_checkpointing", v["trainer.gradient_checkpointing"]),
        optimizer=str(v["optim.name"]), mode=str(v["mode"]),
        base_quant=None if base_quant is None else str(base_quant), double_quant=double_quant,
        kv_cache_len=v.get("estimate.kv_cache_len"),
        weights_dtype=v.get("model.dtype"),
        master_weights=_bool("estimate.master_weights", v.get("estimate.master_weights", True)),
        device=str(device), attention=str(v.get("estimate.attention", "auto")),
        task=str(v.get("task.type") or "auto"),
        padded=_padded(v),
        overhead_bytes=None if overhead_gb is None else int(overhead_gb * GiB),
        heap_slack=_bool("estimate.cpu_heap_slack", v.get("estimate.cpu_heap_slack", True)),
    )


def _padded(v: dict[str, Any]) -> bool:
    """``estimate.padded``: true, false, or auto (the default): padded when a batch holds several examples."""
    value = v.get("estimate.padded", "auto")
    if value == "auto":
        batch = v["trainer.batch_size"]
        return not isinstance(batch, int) or batch > 1
    return _bool("estimate.padded", value)


def _method_fields(method: Any) -> set[str]:
    from peftlab.methods import METHODS

    cls = METHODS.get(str(method))
    return {f.name for f in dataclasses.fields(cls.config_class)} if cls is not None else set()


def _measured_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def estimate_main(argv: list[str], measure: Callable[[list[str], str], dict | int] | None = None) -> int:
    """``measure(overrides, allocator)`` runs real steps and returns their peak (bytes, or a dict with
    ``peak_bytes`` and ``seq_len``); ``peftlab estimate`` passes the trainer's
    (peftlab/training/measure.py), which this module does not import: memory does not depend on training."""
    parser = argparse.ArgumentParser(prog="peftlab estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value, as for peftlab train")
    parser.add_argument("--json", action="store_true", help="print JSON: total_bytes and one key per part")
    parser.add_argument("--measure", action="store_true", help="also run 3 real steps and report the measured peak")
    parser.add_argument("--allocator", choices=["returning", "default"], default="returning",
                        help="CPU --measure: 'returning' (default) makes glibc return every freed tensor to the OS, so "
                        "the RSS growth is reproducible and is compared without the heap-slack allowance; 'default' "
                        "keeps glibc's heap reuse and compares with it")
    args = parser.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice says nothing about memory
    try:
        values = parse_overrides(args.overrides)
        # --measure compares with this machine: estimate for the device the steps will run on.
        result = build_estimate(values, device_hint=_measured_device() if args.measure else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = result.to_dict()
    if args.measure:
        returning = result.inputs["device"] == "cpu" and args.allocator == "returning"
        try:
            if measure is None:
                raise ImportError("no measuring function was given")
            measured = measure(args.overrides, args.allocator)
        except (ImportError, AttributeError) as err:
            print(f"error: --measure needs peftlab.training.measure.measure_for_estimate ({err})", file=sys.stderr)
            return 2
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        # the measured batches are padded to their longest example: compare at the widest one measured
        width = measured.get("seq_len") if isinstance(measured, dict) else None
        measured = measured["peak_bytes"] if isinstance(measured, dict) else measured
        same = result
        if width and width < result.inputs["seq_len"]:
            same = build_estimate({**values, "task.max_length": width}, device_hint=result.inputs["device"])
        # like with like: CUDA measures every tensor (weights included), CPU the RSS training adds; with
        # freed memory returned to the OS there is no heap slack to allow for
        compared = same.allocated_bytes if result.inputs["device"] == "cuda" else same.training_bytes
        if returning:
            compared -= same.cpu_heap_slack
        out.update(measured_peak_bytes=int(measured), measured_seq_len=width, compared_bytes=compared,
                   allocator="returning" if returning else "default",
                   estimate_error=compared / measured - 1 if measured else None)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(result.format_table())
    if args.measure:
        print(f"{'measured peak':<20}{out['measured_peak_bytes'] / GiB:>10.2f}{out['measured_peak_bytes'] / GB:>10.2f}"
              f"   (estimate of the same{f' at the widest measured batch, {width} tokens' if same is not result else ''}"
              f" {out['compared_bytes'] / GiB:.2f} GiB, "
              f"{100 * (out['estimate_error'] or 0):+.1f}%{', heap slack excluded: freed memory returned to the OS' if out['allocator'] == 'returning' else ''})")
    return 0


__all__ = ["DEFAULTS", "PARTS", "build_estimate", "estimate_main", "parse_overrides", "run_defaults"]

