"""Every config in conf/ composes and validates against its typed schema."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from peftlab.config import CONF_DIR, compose, validate
from peftlab.errors import ConfigError

GROUPS = ["model", "task", "method", "optim", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "hf"):
        overrides += ["model.path=/tmp/some-model", "model.kind=causal"]  # kind=auto reads the model (tests/models)
    cfg = compose(overrides)
    run = validate(cfg)
    if group == "trainer":
        return
    # a variant YAML (method=adapter_pfeiffer) extends its method's YAML through its defaults list
    variant_of = (OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("defaults") or [None])[0]
    assert getattr(run, group).name in (option, variant_of)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    validate(compose([f"+experiment={experiment}"]))


def test_method_yaml_keys_equal_schema_fields():
    """Each conf/method YAML states every field of its dataclass (documented defaults)."""
    import dataclasses

    from omegaconf import OmegaConf

    from peftlab.methods import METHODS

    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path))
        if "defaults" in values:  # a variant: composes to its base method's YAML plus its own values
            values = OmegaConf.to_container(compose([f"method={path.stem}"]).method)
        schema = METHODS[values["name"]].config_class
        assert set(values) == {f.name for f in dataclasses.fields(schema)}, path.name


def test_public_keys_exist():
    run = validate(compose(["method=lora"]))
    for dotted in ["method.r", "method.alpha", "method.dropout", "method.targets", "optim.lr", "optim.weight_decay",
                   "trainer.batch_size", "trainer.grad_accum", "trainer.max_steps", "trainer.epochs",
                   "trainer.precision", "trainer.gradient_checkpointing", "task.max_length"]:
        group, key = dotted.split(".")
        assert hasattr(getattr(run, group), key), dotted


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"^method\.rank: unknown key; allowed keys: .*\br\b"):
        validate(compose(["+method.rank=4"]))
    with pytest.raises(ConfigError, match=r"^trainer\.batchsize: unknown key"):
        validate(compose(["+trainer.batchsize=4"]))


def test_wrong_type_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"^method\.r: "):
        validate(compose(["method.r=four"]))
