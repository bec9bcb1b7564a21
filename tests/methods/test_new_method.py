"""Adding a method is one file, one YAML and one registry entry, and nothing else.

A copy of the package gets tests/data/lora_fa.py (LoRA-FA, written only against
peftlab/methods/base.py), conf/method/lora_fa.yaml and its import + line in the registry. With no
other file changed, in that copy: the contract tests run for it and pass, ``peftlab estimate``
counts its parameters exactly and asks its memory hook, budget matching sizes it, and a run trains it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_encoder_files

ROOT = Path(__file__).resolve().parents[2]
YAML = """# LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA with A frozen at its random init.
name: lora_fa
r: 8              # rank of ΔW = (alpha/r) · B A
alpha: 16         # scale alpha/r
targets: [q, v]   # short names, attention, mlp, all-linear, re:<regex>
layers: null      # null = every block
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A copy of peftlab/, conf/ and the contract tests, plus the new method's three pieces."""
    root = tmp_path_factory.mktemp("new_method")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "peftlab", root / "peftlab", ignore=ignore)
    shutil.copytree(ROOT / "conf", root / "conf", ignore=ignore)
    (root / "tests").mkdir()
    (root / "tests/methods").mkdir()
    shutil.copy(ROOT / "tests/conftest.py", root / "tests/conftest.py")
    shutil.copy(ROOT / "tests/methods/test_contract.py", root / "tests/methods/test_contract.py")
    shutil.copy(ROOT / "tests/data/lora_fa.py", root / "peftlab/methods/lora_fa.py")  # 1. the file
    (root / "conf/method/lora_fa.yaml").write_text(YAML)                           # 2. the YAML
    registry = root / "peftlab/methods/__init__.py"                                 # 3. the registry entry
    text = registry.read_text()
    text = text.replace("from peftlab.methods.lora import LoRA\n",
                        "from peftlab.methods.lora import LoRA\nfrom peftlab.methods.lora_fa import LoRAFA\n")
    text = text.replace('    "lora": LoRA,\n', '    "lora": LoRA,\n    "lora_fa": LoRAFA,\n')
    registry.write_text(text)
    changed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and not (ROOT / p.relative_to(root)).is_file())
    assert changed == ["conf/method/lora_fa.yaml", "peftlab/methods/lora_fa.py"]  # + the edited registry
    return root


def run(package: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=package, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_copy_imports_its_own_peftlab(package):
    done = run(package, "-c", "import peftlab, peftlab.methods as m; print(peftlab.__file__); print('lora_fa' in m.METHODS)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(package / "peftlab/__init__.py"), "True"]


def test_the_contract_tests_pass_for_it(package):
    done = run(package, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/methods/test_contract.py",
               "-k", "lora_fa", "-W", "ignore")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 8 and "failed" not in summary and "skipped" not in summary, summary


ESTIMATE = """
import json
from peftlab.memory.estimate import estimate
from peftlab.models.loading import load_base
from peftlab.methods import METHODS

model, _, arch = load_base("minilm")
method = METHODS["lora_fa"](METHODS["lora_fa"].config_class())
method.apply(model, arch)
real = sum(p.numel() for p in method.trainable_parameters(model).values()) + sum(
    p.numel() for n, p in model.named_parameters() if n in arch.head_parameters)
fa = estimate("minilm", "lora_fa", batch_size=8, seq_len=64, device="cpu")
lora = estimate("minilm", "lora", batch_size=8, seq_len=64, device="cpu")
print(json.dumps({"real": real, "closed_form": method.expected_trainable(model),
                  "estimated": fa.trainable_params, "frozen_extra": fa.frozen_weights - lora.frozen_weights,
                  "activations": fa.activations, "lora_activations": lora.activations, "notes": fa.notes,
                  "total": fa.total_bytes}))
"""


def test_the_estimate_counts_it_exactly_and_asks_its_memory_hook(package):
    done = run(package, "-c", ESTIMATE)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["closed_form"] == 6 * 2 * 8 * 384                # B (384 × 8) on q and v of 6 blocks
    assert out["estimated"] == out["real"] == out["closed_form"] + 384 * 2 + 2  # + the classification head
    assert out["frozen_extra"] == 4 * 6 * 2 * 8 * 384           # the frozen A's, fp32, are weights too
    # its hook says it keeps A x, not x: less than LoRA, which keeps the q/v input as well
    assert 0 < out["activations"] < out["lora_activations"]
    assert out["total"] > 0 and any("approximate" in n for n in out["notes"])  # a new method is approximate


def test_budget_matching_sizes_it_and_a_run_trains_it(package, tmp_path):
    tiny_encoder_files(tmp_path)
    budget = 2 * 2 * 32 * 5  # B on q and v of 2 blocks at r = 5
    overrides = [
        "model=hf", f"model.path={tmp_path / 'model'}", "model.kind=encoder", "task.source=csv",
        f"+task.path={tmp_path / 'reviews.csv'}", "task.validation_size=8", "task.test_size=8",
        "task.max_train_examples=16", "task.max_length=16", "task.probes=[]", "method=lora_fa", f"budget={budget}",
        "optim.lr=0.05", "trainer.max_steps=8", "trainer.batch_size=8", "trainer.eval_batch_size=8",
        "trainer.progress=false", "trainer.threads=1", "logger=none", f"out_dir={tmp_path / 'run'}",
    ]
    done = run(package, "-c", "import sys; from peftlab.cli import main; sys.exit(main(sys.argv[1:]))",
               "train", *overrides)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(next((tmp_path / "run").rglob("result.json")).read_text())
    assert result["status"] == "ok"
    assert result["config"]["method"]["name"] == "lora_fa" and result["config"]["method"]["r"] == 5
    assert result["params"]["trainable"] == budget == result["params"]["expected_trainable"]
    from safetensors.torch import load_file

    adapter = load_file(next((tmp_path / "run").rglob("adapter.safetensors")))
    assert any(k.endswith("lora_B") and adapter[k].abs().max() > 0 for k in adapter)  # B moved off zero
    assert any(k.endswith("lora_A") for k in adapter)  # the frozen A travels with the adapter
