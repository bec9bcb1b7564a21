"""Step time and peak memory of every registered method, against the frozen-base lower bound and peft.

    .venv/bin/python benchmarks/bench_methods.py [--models minilm smollm2-135m] [--methods lora dora ...]
                                                 [--steps 5] [--warmup 2] [--out results/benchmarks/]

One fixed batch per model, the same for every variant:
  minilm        32 × 64 random tokens through the encoder's classification head (cross-entropy)
  smollm2-135m  8 × 64 random tokens, causal-LM loss

Variants (each on its own copy of the loaded model; frozen weights are shared between copies,
not duplicated, so every variant fits in one process; full and bitfit get a private copy):
  bound    the frozen-base lower bound: forward + backward to ``inputs_embeds`` (requires_grad),
           no trainable weight, no optimizer
  peftlab  ``METHODS[name](config_class()).apply(model, arch)``; the task head trains, as in the
           trainer; one step = loss (+ extra_loss), backward, after_backward, AdamW step, zero_grad
  peft     the same method with the same config values through ``peft.get_peft_model`` on the same
           target modules (the config from tests/peft_reference.py, the mapping the parity tests use;
           AdaLoRA: + ``update_and_allocate``; LoRA+: ``create_loraplus_optimizer``;
           QLoRA: peftlab's bitsandbytes quantization, then peft's LoRA over it)

Time: rounds interleave the variants (round k steps every variant once, in an order rotated
by k), so a busy machine slows all of them alike. Round 0 is the memory step, then --warmup
untimed rounds, then --steps timed rounds. A variant's time is the median of its timed steps;
a ratio is the median over timed rounds of the per-round ratio (paired), and the run order
keeps each pair the targets compare next to each other (peftlab lora, bound, peft lora, ...).
Process CPU time per step is recorded too (CSV/JSON).

OpenMP: the benchmark runs under the wait policy training gets (libgomp's default: a thread spins
briefly, then sleeps), so run it on an otherwise idle machine. ``OMP_WAIT_POLICY=PASSIVE`` keeps a
machine shared with other busy processes usable (spinning threads steal the core a descheduled peer
needs: steps 3-6× slower there) but is not what training runs under, and it charges every parallel
region a wake-up: methods with many small ops pay more (smollm2-135m LoRA / bound, 15 rounds, same
idle machine: 1.068 passive, 1.044 default, 1.045 active; the bound itself 6% slower passive).
The policy in force is recorded in the JSON.

Peak memory: the bytes of live tensors at the peak of each variant's first step (untimed) =
the tensors alive at its start (parameters, buffers, quantization state; the shared frozen
weights counted for every variant, as if it ran alone) + the highest rise of allocations
within the step (activations, gradients, and the optimizer state the first AdamW step creates;
CPU: torch.profiler's allocation events, CUDA: max_memory_allocated). The same definition on
both devices; Python and library overhead are not included.

Models stay in train mode (dropout on) for every variant. Config values are the registry
defaults except MODEL_OVERRIDES (VeRA's rank on smollm2-135m), the same for peftlab and peft.

Writes ``methods_<device>.md``, ``.csv`` and ``.json`` (device, versions, git state, command)
to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # packaged weights only: never reach for the hub

import torch  # noqa: E402 (after the environment is set)
from torch import nn

from peftlab.config import OptimConfig
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.models.loading import Arch, load_base
from peftlab.training.optim import build_optimizer
from peftlab.reporting.results import device_description, git_state, now, versions, write_json_atomic
from peftlab.models.targets import resolve_targets

# The peft side (config mapping, PEFT_METHODS) is the parity tests' own: tests/peft_reference.py.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from peft_reference import PEFT_METHODS, peft_config, restore_prefix_forward  # noqa: E402

BATCH = {"minilm": (32, 64), "smollm2-135m": (8, 64)}  # (examples, tokens)
LR = 5e-4  # AdamW's learning rate; it does not change the cost of a step
OWN_WEIGHTS = ("full", "bitfit")  # methods that train base weights: they get a private copy
# Config values that differ from the registry default, per model (applied to peftlab and peft alike).
MODEL_OVERRIDES = {
    # VeRA's default r=256 exceeds min(d, k)=192 of SmolLM2's v_proj (192×576, grouped-query
    # attention), which peftlab refuses; 192 is the largest rank that fits every target.
    "smollm2-135m": {"vera": {"r": 192}},
}
TARGETS = {  # the issue's targets: (numerator, denominator, metric, limit)
    "LoRA time ≤ 1.05× bound": ("lora/peftlab", "bound", "time", 1.05),
    "LoRA time ≤ 1.00× peft": ("lora/peftlab", "lora/peft", "time", 1.00),
    "DoRA time ≤ 1.25× LoRA": ("dora/peftlab", "lora/peftlab", "time", 1.25),
    "LoRA memory ≤ 1.05× bound": ("lora/peftlab", "bound", "memory", 1.05),
    "LoRA memory ≤ 1.00× peft": ("lora/peftlab", "lora/peft", "memory", 1.00),
    "DoRA memory ≤ 1.25× LoRA": ("dora/peftlab", "lora/peftlab", "memory", 1.25),
}
CONTEXT = {  # printed beside the targets, no limit
    "peft DoRA time / peft LoRA": ("dora/peft", "lora/peft", "time"),
    "peft DoRA memory / peft LoRA": ("dora/peft", "lora/peft", "memory"),
}


@dataclass
class Variant:
    method: str                     # "bound" or a registry name
    impl: str                       # bound | peftlab | peft
    model: nn.Module | None = None
    step: Callable[[int], None] | None = None  # one training step, given its index
    optimizer: torch.optim.Optimizer | None = None
    trainable: int = 0              # parameters the optimizer updates (the task head included)
    config: dict = field(default_factory=dict)
    steps_done: int = 0
    times: dict[int, float] = field(default_factory=dict)      # timed round -> wall seconds
    cpu_times: dict[int, float] = field(default_factory=dict)  # timed round -> process CPU seconds
    peak_bytes: int | None = None
    resident_bytes: int | None = None   # tensors alive at the start of the memory step
    status: str = "ok"              # ok | skipped | failed
    reason: str | None = None

    @property
    def key(self) -> str:
        return self.method if self.impl == "bound" else f"{self.method}/{self.impl}"

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times.values()) if self.times else None


# --------------------------------------------------------------------------- #
# Building the variants
# --------------------------------------------------------------------------- #
def fixed_batch(model_name: str, model: nn.Module, kind: str, device: torch.device) -> dict:
    examples, tokens = BATCH[model_name]
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(1000, vocab, (examples, tokens), generator=generator)  # past special tokens
    labels = input_ids.clone() if kind == "causal" else torch.randint(0, 2, (examples,), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class Copier:
    """Copies of the base model that share its frozen weights (the task head is always private)."""

    def __init__(self, base: nn.Module, head_names: list[str]):
        self.base = base
        self.shared = {id(p): p for n, p in base.named_parameters() if n not in set(head_names)}

    def copy(self, private: bool = False) -> nn.Module:
        return copy.deepcopy(self.base) if private else copy.deepcopy(self.base, memo=dict(self.shared))

    def check_frozen(self, what: str) -> None:
        unfrozen = [p for p in self.shared.values() if p.requires_grad]
        if unfrozen:
            raise RuntimeError(f"{what} made {len(unfrozen)} shared base weights trainable; "
                               f"add it to OWN_WEIGHTS so it gets a private copy")


def method_config(name: str, model_name: str):
    cls = METHODS[name]
    return cls.config_class(**MODEL_OVERRIDES.get(model_name, {}).get(name, {}))


def build_bound(copier: Copier, batch: dict) -> Variant:
    model = copier.copy()
    embed = model.get_input_embeddings()

    def step(index: int) -> None:
        inputs_embeds = embed(batch["input_ids"]).detach().requires_grad_(True)  # (B, T, d)
        loss = model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()

    return Variant("bound", "bound", model=model, step=step)


def build_peftlab(name: str, copier: Copier, arch, batch: dict, total_steps: int, model_name: str) -> Variant:
    config = method_config(name, model_name)
    method = METHODS[name](config)
    model = copier.copy(private=name in OWN_WEIGHTS)
    head = [p for n, p in model.named_parameters() if n in set(arch.head_parameters)]
    torch.manual_seed(0)
    method.apply(model, arch)
    for p in head:
        p.requires_grad_(True)
    optimizer = build_optimizer(OptimConfig(lr=LR), method.param_groups(model, LR, 0.0), head)
    method.on_train_start(model, total_steps)

    def step(index: int) -> None:
        loss = model(**batch).loss
        extra = method.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        method.after_backward(model, index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(name, "peftlab", model=model, step=step, optimizer=optimizer,
                   trainable=count_optimized(optimizer), config=vars(config))


def build_peft(name: str, copier: Copier, arch, batch: dict, total_steps: int, model_name: str) -> Variant:
    import peft
    from peft.optimizers import create_loraplus_optimizer

    config = method_config(name, model_name)
    task_type = "SEQ_CLS" if arch.kind == "encoder" else "CAUSAL_LM"  # SEQ_CLS trains the head (modules_to_save)
    peft_cfg = peft_config(name, config, copier.base, task_type, total_steps=total_steps, resolve=resolve_targets)
    model = copier.copy()
    if name == "qlora":
        from peftlab.methods.qlora import COMPUTE_DTYPES, quantize

        quantize(model, config.bits, config.quant_type, config.double_quant, COMPUTE_DTYPES[config.compute_dtype])
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = config.bits == 4, config.bits == 8  # peft's bnb dispatch
    torch.manual_seed(0)
    model = restore_prefix_forward(peft.get_peft_model(model, peft_cfg))  # a no-op but for prefix on BERT
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "loraplus":
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=config.lr_ratio,
                                              weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(index: int) -> None:
        loss = model(**batch).loss  # peft's AdaLoRA adds its orthogonality term inside forward
        loss.backward()
        if name == "adalora":
            model.base_model.update_and_allocate(index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(name, "peft", model=model, step=step, optimizer=optimizer,
                   trainable=count_optimized(optimizer), config=peft_cfg.to_dict())


def count_optimized(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def build_all(model_name: str, methods: list[str], copier: Copier, arch, batch: dict, total_steps: int) -> list[Variant]:
    variants = [build_bound(copier, batch)]
    for name in methods:
        builders = [("peftlab", build_peftlab)] + ([("peft", build_peft)] if name in PEFT_METHODS else [])
        for impl, build in builders:
            try:
                variant = build(name, copier, arch, batch, total_steps, model_name)
                copier.check_frozen(f"{name}/{impl}")
            except ConfigError as err:  # the method cannot serve this model (bitfit without biases)
                variant = Variant(name, impl, status="skipped", reason=str(err))
            except Exception as err:  # noqa: BLE001 - a benchmark reports a broken variant and goes on
                variant = Variant(name, impl, status="failed", reason=one_line(err))
                traceback.print_exc(file=sys.stderr)
            variants.append(variant)
    return variants


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(variant: Variant, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    variant.step(variant.steps_done)
    synchronize(device)
    variant.steps_done += 1
    return time.perf_counter() - start, time.process_time() - start_cpu


def tensors_of(variant: Variant) -> list[torch.Tensor]:
    """Every tensor a variant keeps between steps: parameters, grads, buffers, optimizer and quantization state."""
    found = list(variant.model.parameters()) + list(variant.model.buffers())
    found += [p.grad for p in variant.model.parameters() if p.grad is not None]
    if variant.optimizer is not None:
        for state in variant.optimizer.state.values():
            found += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for p in variant.model.parameters():
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: block scales, nested scales
        while quant_state is not None:
            found += [t for t in (quant_state.absmax, quant_state.code, quant_state.offset) if isinstance(t, torch.Tensor)]
            quant_state = getattr(quant_state, "state2", None)
        scb = getattr(p, "SCB", None)  # bitsandbytes Int8Params: row scales
        if isinstance(scb, torch.Tensor):
            found.append(scb)
    return found


def resident_bytes(variant: Variant) -> int:
    storages = {}
    for tensor in tensors_of(variant):
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def allocation_rise_cpu(run: Callable[[], None]) -> int:
    """The highest rise of live CPU allocations while ``run()`` executes (torch.profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure_peak(variant: Variant, device: torch.device) -> int:
    """Bytes alive at the peak of one step (see the module docstring)."""
    resident = variant.resident_bytes = resident_bytes(variant)
    run = lambda: variant.step(variant.steps_done)  # noqa: E731
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        rise = torch.cuda.max_memory_allocated(device) - before
    else:
        rise = allocation_rise_cpu(run)
    variant.steps_done += 1
    return resident + rise


def guarded(variant: Variant, action: Callable[[], object]):
    try:
        return action()
    except Exception as err:  # noqa: BLE001 - drop the variant, keep the others running
        traceback.print_exc(file=sys.stderr)
        variant.status, variant.reason = "failed", one_line(err)
        variant.model = variant.step = variant.optimizer = None
        return None


def run_order(variants: list[Variant]) -> list[Variant]:
    """Registry order, with the bound right after peftlab's LoRA (the pairs the targets compare are adjacent)."""
    bound, others = variants[0], variants[1:]
    keys = [v.key for v in others]
    at = keys.index("lora/peftlab") + 1 if "lora/peftlab" in keys else 0
    return others[:at] + [bound] + others[at:]


def run_rounds(variants: list[Variant], warmup: int, steps: int, device: torch.device, label: str) -> None:
    from tqdm.auto import tqdm

    live = [v for v in run_order(variants) if v.status == "ok"]
    bar = tqdm(total=len(live) * (1 + warmup + steps), desc=label, file=sys.stderr, dynamic_ncols=True)
    for round_index in range(1 + warmup + steps):
        live = [v for v in live if v.status == "ok"]
        shift = round_index % max(1, len(live))
        for variant in live[shift:] + live[:shift]:  # rotated: no variant always runs first
            if round_index == 0:  # the first step, instrumented for memory, untimed
                variant.peak_bytes = guarded(variant, lambda: measure_peak(variant, device))
            elif round_index <= warmup:
                guarded(variant, lambda: timed_step(variant, device))
            else:
                seconds = guarded(variant, lambda: timed_step(variant, device))
                if seconds is not None:
                    variant.times[round_index], variant.cpu_times[round_index] = seconds
            bar.update()
    bar.close()


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #
def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare(variant: Variant | None, reference: Variant | None, which: str) -> float | None:
    """variant / reference: memory as a plain ratio; time as the median of per-round ratios (paired)."""
    if variant is None or reference is None or "ok" != variant.status or "ok" != reference.status:
        return None
    if which == "memory":
        return ratio(variant.peak_bytes, reference.peak_bytes)
    rounds = sorted(set(variant.times) & set(reference.times))
    if not rounds:
        return None
    return statistics.median(variant.times[r] / reference.times[r] for r in rounds)


def rows_for(variants: list[Variant]) -> list[dict]:
    by_key = {v.key: v for v in variants}
    bound = by_key["bound"]
    rows = []
    for v in variants:
        peft_twin = by_key.get(f"{v.method}/peft") if v.impl == "peftlab" else None
        times = list(v.times.values())
        rows.append({
            "method": v.method, "impl": v.impl, "status": v.status, "reason": v.reason,
            "trainable": v.trainable if v.status == "ok" else None,
            "step_ms": 1e3 * v.median_s if v.median_s is not None else None,
            "step_ms_min": 1e3 * min(times) if times else None,
            "step_ms_max": 1e3 * max(times) if times else None,
            "step_cpu_ms": 1e3 * statistics.median(v.cpu_times.values()) if v.cpu_times else None,
            "timed_steps": len(times),
            "time_x_bound": compare(v, bound, "time"),
            "time_x_peft": compare(v, peft_twin, "time"),
            "peak_mb": v.peak_bytes / 2**20 if v.peak_bytes is not None else None,
            "resident_mb": v.resident_bytes / 2**20 if v.resident_bytes is not None else None,
            "memory_x_bound": compare(v, bound, "memory"),
            "memory_x_peft": compare(v, peft_twin, "memory"),
            "times_s": times,
            "config": v.config,
        })
    return rows


def targets_for(variants: list[Variant]) -> list[dict]:
    by_key = {v.key: v for v in variants}
    found = []
    for label, (num, den, which, limit) in TARGETS.items():
        value = compare(by_key.get(num), by_key.get(den), which)
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
        found.append({"target": label, "value": value, "limit": limit, "verdict": verdict})
    for label, (num, den, which) in CONTEXT.items():
        value = compare(by_key.get(num), by_key.get(den), which)
        found.append({"target": label, "value": value, "limit": None, "verdict": "info"})
    return found


def fmt(value, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def markdown(model_name: str, header: str, rows: list[dict], targets: list[dict]) -> str:
    lines = [f"### {model_name}: {header}", "",
             "| method | impl | trainable | step ms | range ms | × bound | × peft | peak MB | × bound | × peft |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['impl']} | {r['status']}: {r['reason']} |||||||| ")
            continue
        spread = f"{r['step_ms_min']:.0f}–{r['step_ms_max']:.0f}" if r["step_ms_min"] is not None else ""
        lines.append(
            f"| {r['method']} | {r['impl']} | {r['trainable']:,} | {fmt(r['step_ms'], '.0f')} | {spread} | "
            f"{fmt(r['time_x_bound'])} | {fmt(r['time_x_peft'])} | {fmt(r['peak_mb'], '.0f')} | "
            f"{fmt(r['memory_x_bound'])} | {fmt(r['memory_x_peft'])} |")
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {fmt(t['value'], '.3f')} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, device: torch.device, report: dict, sections: list[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"methods_{device.type}"
    md = stem.with_suffix(".md")
    intro = (f"# Method step time and peak memory ({report['device']}, {report['torch_threads']} threads)\n\n"
             f"`{report['command']}`\n\ntorch {report['versions'].get('torch')}, peft {report['versions'].get('peft')}, "
             f"transformers {report['versions'].get('transformers')}; git {report['git_sha']} "
             f"(dirty: {report['git_dirty']}); {report['finished_at']}\n\n"
             f"step = forward + backward + AdamW step (bound: forward + backward to inputs_embeds, no optimizer); "
             f"median of {report['steps']} interleaved timed steps after a memory step and {report['warmup']} warm-up "
             f"step(s); ratios are medians of per-round ratios; peak MB = live tensors at the peak of the first step "
             f"(weights and optimizer state included). See the script's docstring.\n\n")
    md.write_text(intro + "\n".join(sections), encoding="utf-8")
    csv_path = stem.with_suffix(".csv")
    columns = ["model", "method", "impl", "status", "trainable", "step_ms", "step_ms_min", "step_ms_max", "step_cpu_ms",
               "timed_steps",
               "time_x_bound", "time_x_peft", "peak_mb", "resident_mb", "memory_x_bound", "memory_x_peft", "reason"]
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for model_name, section in report["models"].items():
            for row in section["rows"]:
                writer.writerow({"model": model_name, **row})
    json_path = stem.with_suffix(".json")
    write_json_atomic(json_path, report)
    return [md, csv_path, json_path]


# --------------------------------------------------------------------------- #
def prepare(model_name: str, device: torch.device) -> tuple[Arch, dict, Copier]:
    """(arch, the fixed batch, a Copier of the frozen base in train mode): what every variant is built from."""
    base, _tokenizer, arch = load_base(model_name)
    base.to(device).train()  # dropout on, as in training, for every variant alike
    for p in base.parameters():
        p.requires_grad_(False)
    return arch, fixed_batch(model_name, base, arch.kind, device), Copier(base, arch.head_parameters)


def bench_model(model_name: str, methods: list[str], args, device: torch.device) -> tuple[dict, str]:
    started = time.perf_counter()
    arch, batch, copier = prepare(model_name, device)
    total_steps = 1 + args.warmup + args.steps
    variants = build_all(model_name, methods, copier, arch, batch, total_steps)
    built = time.perf_counter()
    run_rounds(variants, args.warmup, args.steps, device, model_name)
    rows, targets = rows_for(variants), targets_for(variants)
    examples, tokens = BATCH[model_name]
    loss = "classification head, cross-entropy" if arch.kind == "encoder" else "causal-LM loss"
    header = (f"batch {examples} × {tokens} tokens, {loss}; per variant 1 memory + {args.warmup} warm-up + "
              f"{args.steps} timed steps, interleaved")
    section = markdown(model_name, header, rows, targets)
    print(section, flush=True)
    result = {"batch": [examples, tokens], "loss": loss, "overrides": MODEL_OVERRIDES.get(model_name, {}),
              "rows": rows, "targets": targets, "build_s": built - started, "wall_s": time.perf_counter() - started}
    return result, section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per variant after the memory step (itself the first untimed step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{device_description(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'default'}, load average {load}", flush=True)
    started_at = now()
    models, sections = {}, []
    for model_name in args.models:  # the files are rewritten after each model: an interrupted run keeps its part
        models[model_name], section = bench_model(model_name, args.methods, args, device)
        sections.append(section)
        report = {
            "device": device_description(device), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default", "load_average_at_start": load,
            "load_average_now": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "versions": versions(),
            **git_state(), "command": shlex.join([sys.executable, *sys.argv]), "started_at": started_at,
            "finished_at": now(), "steps": args.steps, "warmup": args.warmup, "learning_rate": LR, "models": models,
        }
        paths = write_outputs(args.out, device, report, sections)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
