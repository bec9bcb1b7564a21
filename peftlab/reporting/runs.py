"""Read runs back: rebuild the base model with a run's adapter applied."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftlab.config import ModelConfig
from peftlab.methods import method_class
from peftlab.models.loading import load_model
from peftlab.reporting.results import load_result

HEAD_PREFIX = "__head__."


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "adapter" / "adapter_config.json").exists() and (path / "result.json").exists()


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read adapter config ({err})") from None
    if config.get("format") != "peftlab-adapter-v1":
        raise ValueError(f"{path}: not a peftlab adapter (format={config.get('format')!r})")
    return config


def load_run(run_dir: Path, device: str = "cpu"):
    """(model, method, result) with the run's adapter (and task head) loaded into the base.

    For full fine-tuning ``method.reference`` holds a second copy of the base,
    so ``method.delta_weights(model)`` can return W - W0.
    """
    run_dir = Path(run_dir)
    result = load_result(run_dir)
    adapter_dir = run_dir / "adapter"
    config = read_adapter_config(adapter_dir)
    try:
        tensors = load_file(adapter_dir / "adapter.safetensors")
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{adapter_dir / 'adapter.safetensors'}: cannot read ({err})") from None
    method_cls = method_class(config["method"])
    method_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(method_cls.config_class), config["method_config"]))
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"]))
    task_type = config["task"]["type"]
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    num_labels = next((v.shape[0] for k, v in head.items() if k.endswith("weight")), 2)
    model, _, arch = load_model(model_cfg, task_type, num_labels)
    method = method_cls(method_cfg)
    if getattr(method, "needs_reference", False):
        method.reference = load_model(model_cfg, task_type, num_labels)[0].eval()
    method.apply(model, arch)
    method.load_state_dict(model, {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)})
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in head.items():
            params[name].copy_(value)
    return model.to(device).eval(), method, result
