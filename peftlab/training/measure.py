"""Measure what a configuration's training steps add to memory (``peftlab estimate --measure``)."""
from __future__ import annotations

from pathlib import Path

from peftlab.config import compose, validate
from peftlab.errors import ConfigError
from peftlab.memory.measure import return_freed_memory, training_growth
from peftlab.training.tracking import Tracker
from peftlab.training.trainer import Trainer


def measure_training_peak(overrides: list[str], steps: int = 3) -> dict:
    """What the training phase of this configuration adds at its peak (``peftlab estimate --measure``).

    Runs ``steps`` real optimizer steps through the trainer (no evaluation, no saving) and
    returns ``{"peak_bytes", "seq_len"}``: peak minus the baseline at the start of training, RSS
    growth on CPU (the weights paged in and the heap trimmed before the baseline, see
    :class:`PeakMemory`), ``max_memory_allocated`` on CUDA (where the baseline is the resident
    weights); and the widest batch's tokens per sequence (batches are padded to their longest
    example, so it can be below ``task.max_length``: an estimate to compare must use it).
    """
    import tempfile

    run_overrides = [o for o in overrides if o.partition("=")[0].split(".")[0] not in ("mode", "estimate")]
    cfg = validate(compose(run_overrides + [f"trainer.max_steps={steps}", "trainer.eval_before=false",
                                            "trainer.save_adapter=false", "trainer.progress=false", "logger=none"]))
    with tempfile.TemporaryDirectory(prefix="peftlab-measure-") as tmp:
        trainer = Trainer(cfg, Path(tmp))
        trainer.setup()
        trainer.apply_method()
        tracker = Tracker(cfg.logger, Path(tmp), {}, name="measure")
        try:
            outcome = trainer.fit(tracker)
        finally:
            tracker.finish()
    return {"peak_bytes": training_growth(outcome["memory"]), "seq_len": outcome["train"]["widest_batch_tokens"]}


def measure_for_estimate(overrides: list[str], allocator: str = "returning") -> dict:
    """The ``measure`` hook ``peftlab estimate --measure`` calls: 3 steps, with glibc returning freed
    tensors to the OS (``allocator="returning"``) or keeping them in its heap (``"default"``)."""
    import torch

    if allocator == "returning" and not torch.cuda.is_available() and not return_freed_memory():
        raise ConfigError("--allocator", "'returning' needs glibc's mallopt (Linux); use --allocator default")
    return measure_training_peak(overrides, steps=3)
