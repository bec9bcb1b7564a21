"""peftlab.memory.measure on CPU: the training peak counts neither memory-mapped weights nor setup's leftovers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from peftlab.memory.measure import PeakMemory, page_in, release_free_heap

MiB = 2**20
linux = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def mapped_tensor(path: Path, mib: int) -> torch.Tensor:
    """A float32 tensor backed by a file mapping, as safetensors weights are after loading."""
    path.write_bytes(b"\x00" * (mib * MiB))
    return torch.from_file(str(path), shared=False, size=mib * MiB // 4, dtype=torch.float32)


@linux
def test_page_in_makes_a_mapped_tensor_resident(tmp_path):
    weights = mapped_tensor(tmp_path / "w.bin", 64)
    before = rss()
    page_in([weights])
    assert rss() - before > 0.9 * 64 * MiB


@linux
def test_training_peak_excludes_the_weights_it_was_given(tmp_path):
    """Mapped weights listed as ``resident`` are in the baseline; any other first read counts as growth."""
    weights, other = mapped_tensor(tmp_path / "w.bin", 64), mapped_tensor(tmp_path / "o.bin", 64)
    memory = PeakMemory(torch.device("cpu"))
    memory.start(resident=[weights])
    weights.sum()  # the first forward reads every weight
    assert memory.peak_bytes() - memory.baseline_bytes < 8 * MiB
    other.sum()
    assert memory.peak_bytes() - memory.baseline_bytes > 0.9 * 64 * MiB


@linux
def test_release_free_heap_returns_freed_memory():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    chunks = [bytearray(64 * 1024) for _ in range(1024)]  # 64 MiB of heap chunks (below the mmap threshold)
    pin = bytearray(64 * 1024)  # allocated last: keeps the heap's top from being trimmed on free
    del chunks
    before = rss()
    release_free_heap()
    assert before - rss() > 32 * MiB
    del pin
