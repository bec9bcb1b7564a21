"""Peak memory of the training phase: RSS high-water mark on CPU, max_memory_allocated on CUDA."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch is imported where it is used: peftlab.reporting.table reads reports without it
    import torch

# estimate parts resident before training starts (the loaded, adapted model): what the training
# phase's measurement leaves out, so ``Estimate.training_bytes`` leaves them out too
RESIDENT_PARTS = ("frozen_weights", "quant_constants", "trainable_weights", "kv_cache", "overhead")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _glibc():
    """glibc's C library, or None where there is none (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    Loading and tokenizing leave freed but resident memory in the heap; training would reuse it
    without growing RSS, so what a step seems to add would depend on what setup left behind.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
RETURNING_THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """Make glibc serve every allocation of 128 KiB or more with its own mmap, returned on free.

    glibc's default raises that threshold as large blocks are freed, after which tensors come from
    the heap and freed ones stay resident for reuse: a run's RSS growth then depends on what earlier
    phases happened to leave behind (measured: 880 vs 1110 MiB for the same batches in two processes).
    With the threshold fixed, RSS tracks the live tensors and the growth is reproducible, at the cost
    of a page fault per fresh block (1.36x slower training on this CPU), so only ``--measure`` uses it.
    Same effect as ``MALLOC_MMAP_THRESHOLD_=131072`` at start-up; False where there is no glibc.
    """
    libc = _glibc()
    return libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(M_MMAP_THRESHOLD, RETURNING_THRESHOLD))


def page_in(tensors: Iterable[torch.Tensor]) -> None:
    """Read every byte of these CPU tensors, so that memory-mapped ones are resident afterwards."""
    import torch

    with torch.no_grad():
        for tensor in tensors:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.sum()


class PeakMemory:
    """``start(resident)`` resets the high-water mark; ``peak_bytes()`` reads it.

    CPU: Linux's VmHWM, reset by writing 5 to /proc/self/clear_refs, so the peak
    belongs to training alone (model loading is excluded; the process's
    resident baseline at reset is reported separately). Elsewhere the
    lifetime peak from getrusage is used and ``kind`` says so.

    ``resident``: the model's tensors. Weights loaded from safetensors are
    memory-mapped and become resident only when first read; without reading
    them before the reset, the first forward would page them in and the
    training peak would count the whole model (measured: +512 MiB on
    smollm2-135m, +87 MiB on minilm). The heap's free pages are then given
    back (:func:`release_free_heap`), so the growth does not depend on what
    loading left behind.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_peak"
        self.baseline_bytes = 0

    def start(self, resident: Iterable[torch.Tensor] = ()) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return
        page_in(resident)
        release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "rss_lifetime_peak"
        self.baseline_bytes = (_status_kib("VmRSS") or 0) * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report(self) -> dict:
        return {"kind": self.kind, "peak_bytes": self.peak_bytes(), "baseline_bytes": self.baseline_bytes}


def training_growth(report: dict) -> int | None:
    """What training added at its peak, from a :meth:`PeakMemory.report` (``result.json["memory"]``):
    RSS growth over the baseline on CPU; on CUDA the ``max_memory_allocated`` peak itself (it counts
    every tensor, the weights included). None when the report has no peak."""
    peak = report.get("peak_bytes")
    if not isinstance(peak, (int, float)):
        return None
    return int(peak if str(report.get("kind", "")).startswith("cuda") else peak - (report.get("baseline_bytes") or 0))
