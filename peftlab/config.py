"""Typed schemas for every config group; composing + validating a run's config.

Hydra composes ``conf/`` (YAML that states only values); :func:`validate` then
merges each group into its dataclass schema, so an unknown key or a value of
the wrong type is an error that names the key. The method group's schema is
the method's own ``config_class`` (looked up by ``method.name``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from peftlab.errors import ConfigError
from peftlab.models.loading import ModelConfig  # the model group's schema lives with its loader
from peftlab.paths import CONF_DIR



@dataclass
class TaskConfig:
    name: str = "sentiment"
    type: str = "classification"     # classification | regression | multiple_choice | lm | generation
    source: str = "rotten_tomatoes"  # rotten_tomatoes | hamlet | chatterbot | humaneval | arithmetic | boolq | piqa | openbookqa | commonsenseqa | siqa | csv | jsonl | hf
    path: Optional[str] = None       # csv / jsonl file for source=csv|jsonl
    delimiter: Optional[str] = None  # csv: the field separator (None: tab for .tsv files, else a comma)
    encoding: str = "utf-8"          # csv / jsonl: the file's text encoding
    subset: Optional[str] = None     # source=hf: the dataset's configuration (e.g. mrpc of glue)
    revision: Optional[str] = None   # source=hf: a hub revision (commit, tag or branch)
    split_map: dict = field(default_factory=dict)  # source=hf: {peftlab split: dataset split}, e.g. {test: validation}
    text_column: Any = "text"        # a column, or two [first, second] for text pairs (e.g. [question, passage])
    label_column: str = "label"     # classification: the class; multiple_choice: the answer's index
    options_column: str = "options"  # multiple_choice (csv/jsonl): a list of option texts
    completion_column: str = "completion"  # generation (csv/jsonl): the text the model should write after the prompt
    passage_column: Optional[str] = None  # multiple_choice (csv/jsonl): a passage the prompt shows as {passage}
    labels: list = field(default_factory=list)      # label values in class-index order
    verbalizer: list = field(default_factory=list)  # causal LM: one word per class, e.g. [" negative", " positive"]
    prompt: str = "{text}"           # causal LM formatting; {text} is replaced by the example's text ({passage} too for multiple_choice)
    max_length: int = 64             # tokens per example (truncation)
    validation_size: int = 500       # examples held out for validation
    test_size: int = 1000            # examples held out for test
    split_seed: int = 0              # the split is fixed by this seed, not by the run's seed
    max_train_examples: Optional[int] = None  # cap on the training split (None = all)
    max_eval_examples: Optional[int] = None   # cap on validation/test examples evaluated (None = all)
    metric: str = "accuracy"         # classification: accuracy | f1 | f1_positive | matthews ; regression: pearson | spearman ; multiple_choice: acc | acc_norm ; lm: perplexity
    probes: list = field(default_factory=list)  # forgetting probes (see peftlab/tasks/probes.py)
    chat_template: Any = "auto"      # generation: auto (the tokenizer's chat template when it has one) | true | false
    max_new_tokens: int = 32         # generation: greedy decoding stops after this many new tokens (or at eos / stop)
    stop: Optional[str] = None       # generation: a stop string, e.g. "\n"; the text is cut there (None: eos only)
    answer: str = "text"             # generation: answer extraction, text | last_number | regex:<pattern>


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.06       # linear warmup over this fraction of steps, then cosine decay
    min_lr_ratio: float = 0.0        # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0       # gradient clipping (0 = off)
    head_lr: Optional[float] = None  # task head's learning rate (None = lr)


@dataclass
class TrainerConfig:
    batch_size: int = 32             # global: split across torchrun processes
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 200             # optimizer steps; <= 0 means use epochs
    epochs: float = 1.0
    precision: str = "fp32"          # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False
    device: str = "auto"             # auto (CUDA when present) | cpu | cuda
    threads: int = 0                 # torch threads; 0 = the machine's cores / torchrun processes on it
    log_every: int = 10
    eval_before: bool = True         # evaluate the base model before training
    save_adapter: bool = True
    progress: bool = True
    checkpoint_every: int = 100      # steps between resumable checkpoints in run_dir/checkpoint/ (0 = off)
    overwrite: bool = False          # replace an ok result of another config in the same run dir
    divergence_factor: float = 100.0  # diverged: loss > factor x the early mean loss (of the first `window` steps,
    divergence_steps: int = 5        # losses already above the bar left out) for this many steps in a row
    divergence_window: int = 10      # (0 factor = rule off; a non-finite loss is always diverged)


@dataclass
class LoggerConfig:
    name: str = "none"               # none | wandb
    mode: str = "offline"            # wandb: offline | online | disabled
    project: str = "peftlab"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig
    task: TaskConfig
    method: Any
    optim: OptimConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    seed: int = 0
    out_dir: str = "runs"
    budget: Optional[int] = None     # trainable parameters to size the method to (peftlab/training/budget.py); None = off
    study: dict = field(default_factory=dict)  # a named sweep's own settings, e.g. {name, lr: {method: lr}}


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}
CHOICES = {
    "model.kind": ("encoder", "causal"),
    "model.source": ("package", "hf"),
    "model.dtype": ("float32", "bfloat16"),
    "model.pooling": ("cls", "mean"),
    "task.type": ("classification", "regression", "multiple_choice", "lm", "generation"),
    "optim.name": ("adamw",),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("offline", "online", "disabled"),
}


def _structured(group: str, schema: type, values: Any) -> Any:
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, values if values is not None else {})
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        allowed = ", ".join(f.name for f in fields(schema))
        if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
            raise ConfigError(f"{group}.{key}", f"unknown key; allowed keys: {allowed}") from None
        raise ConfigError(f"{group}.{key}", str(err).splitlines()[0]) from None
    return OmegaConf.to_object(merged)


def validate(cfg: DictConfig | dict) -> RunConfig:
    """A composed config -> typed RunConfig; raises ConfigError naming the bad key."""
    from peftlab.methods import method_class

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    groups = {}
    for group, schema in GROUP_SCHEMAS.items():
        groups[group] = _structured(group, schema, container.pop(group, None))
    method_values = container.pop("method", None) or {}
    if "name" not in method_values:
        raise ConfigError("method.name", "missing; choose a method with method=<name>")
    method_cls = method_class(method_values["name"])
    groups["method"] = _structured("method", method_cls.config_class, method_values)
    seed = container.pop("seed", 0)
    out_dir = container.pop("out_dir", "runs")
    budget = check_budget(container.pop("budget", None))
    study = container.pop("study", None) or {}
    if not isinstance(study, dict):
        raise ConfigError("study", f"got {study!r}; allowed: a mapping (a named sweep's settings)")
    for key in container:
        raise ConfigError(key, "unknown top-level key; allowed: model, task, method, optim, trainer, logger, seed, "
                          "out_dir, budget, study")
    run = RunConfig(seed=seed, out_dir=out_dir, budget=budget, study=study, **groups)
    if run.model.kind == "auto":  # model=hf: read it off the checkpoint's config.json
        from peftlab.models.loading import infer_kind

        if run.model.source == "hf" and not run.model.path:
            raise ConfigError("model.path", "model=hf needs model.path=<transformers model id or local directory>")
        run.model.kind = infer_kind(run.model)
    check_values(run)
    return run


def check_budget(value: Any) -> int | None:
    """``budget`` as a whole number of parameters, or None when off (null or 0); 1e5 is read as 100000."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ConfigError("budget", f"got {value!r}; allowed: a whole number of trainable parameters >= 1, "
                          "or null / 0 (off)")
    return int(value)


def check_values(run: RunConfig) -> None:
    for dotted, allowed in CHOICES.items():
        group, key = dotted.split(".")
        value = getattr(getattr(run, group), key)
        if value not in allowed:
            raise ConfigError(dotted, f"got {value!r}; allowed: {', '.join(allowed)}")
    t, o = run.trainer, run.optim
    positive = {"trainer.batch_size": t.batch_size, "trainer.eval_batch_size": t.eval_batch_size,
                "trainer.grad_accum": t.grad_accum, "task.max_length": run.task.max_length,
                "trainer.log_every": t.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(key, f"got {value}; allowed: an integer >= 1")
    if t.checkpoint_every < 0:
        raise ConfigError("trainer.checkpoint_every", f"got {t.checkpoint_every}; allowed: an integer >= 0 (0 = off)")
    if t.divergence_factor < 0 or (0 < t.divergence_factor <= 1):
        raise ConfigError("trainer.divergence_factor", f"got {t.divergence_factor}; allowed: a number > 1, or 0 (off)")
    for key in ("divergence_steps", "divergence_window"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}", f"got {getattr(t, key)}; allowed: an integer >= 1")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("trainer.max_steps", "both max_steps and epochs are <= 0; allowed: max_steps >= 1 or epochs > 0")
    if o.lr <= 0:
        raise ConfigError("optim.lr", f"got {o.lr}; allowed: a number > 0")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"got {o.weight_decay}; allowed: a number >= 0")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError("optim.warmup_ratio", f"got {o.warmup_ratio}; allowed: a number in [0, 1)")
    if run.model.pooling != "cls" and (run.model.kind != "encoder" or run.task.type == "lm"):
        raise ConfigError("model.pooling", f"got {run.model.pooling!r} for a {run.model.kind} model on a {run.task.type} "
                          "task; allowed: cls (pooling applies to an encoder's head; causal models score by "
                          "next-token logits)")
    if run.model.source == "hf" and not run.model.path:
        raise ConfigError("model.path", "model=hf needs model.path=<transformers model id or local directory>")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose conf/ with the Hydra compose API (tests, notebooks, estimate)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def to_dict(run: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)
