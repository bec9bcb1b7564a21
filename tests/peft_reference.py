"""peft as the reference: peftlab's method configs as Hugging Face peft configs, written once.

peft (a dev dependency, never imported by ``peftlab/``) is the independent numerical reference
of the parity tests in ``tests/methods/`` and the "peft" variant of ``benchmarks/bench_methods.py``.
This module is the one place that says what corresponds to what:

- ``peft_config(name, config, model, task_type)``: the peft config with the same values as a
  peftlab method config (``PEFT_METHODS``: the methods peft has; full, bitfit and the bottleneck
  adapter have no peft counterpart). Keyword overrides go to peft as they are, e.g.
  ``init_lora_weights=False`` for peft's random, non-identity init that parity tests copy into ours.
- ``target_modules``: peftlab's short target names as peft ``target_modules``, either through the
  table ``MODULE_NAMES`` written here (tests: independent of ``peftlab.models.targets``, so a parity
  test also checks which modules peftlab adapts) or through a resolver the caller passes (the
  benchmark: exactly the modules peftlab's resolver picks, on its real models).
- ``ADAPTER_NAMES`` / ``copy_from_peft``: peftlab's adapter tensors (the roles of a layer's
  ``adapter_parameters()``) -> the parameter names peft gives them, to copy peft's init into ours.
- the comparisons the parity tests share, and ``restore_prefix_forward`` (peft 0.21's prefix tuning of
  sequence classifiers under transformers 5.24, see there).

Nothing is imported from peft or pytest at module level: the benchmark imports this file without
pytest, and test modules import it whether peft is installed or not (their peft tests carry
``conftest.requires_peft``).

Not mapped (no parity test or benchmark value depends on them): prompt tuning's ``init`` (peft's
RANDOM / SAMPLE_VOCAB / TEXT differ in detail from peftlab's random / vocab / text; parity tests
copy the soft prompt), LoRA's ``rank_pattern`` (refused), peftlab's ``layers`` without a resolver.
"""
from __future__ import annotations

import copy
import inspect
import re
from typing import Any, Callable

import torch

# The methods peft has, in the benchmark's order.
PEFT_METHODS = ("lora", "rslora", "dora", "loraplus", "adalora", "vera", "ia3", "loha", "lokr",
                "qlora", "prefix", "prompt")
# peftlab methods whose peft counterpart is a LoraConfig (QLoRA: its LoRA part; peftlab quantizes the
# base; LoRA+: its LoRA part, the optimizer is peft.optimizers.create_loraplus_optimizer).
LORA_CONFIGS = ("lora", "rslora", "dora", "loraplus", "qlora")

# peftlab's short target names -> the module name peft matches (a suffix after a dot), per model
# family; only the family parity tests adapt by target name (Llama). See peftlab.models.targets for
# what the short names mean.
MODULE_NAMES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}

# peft's task type for each tiny model family of tests/conftest.py (TINY); the benchmark takes SEQ_CLS
# for encoders, CAUSAL_LM otherwise, as here.
TASK_TYPES = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}

# peftlab adapter role (a layer's adapter_parameters() key) -> peft's parameter name inside the
# adapted module, adapter "default".
_LORA_NAMES = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
ADAPTER_NAMES: dict[str, dict[str, str]] = {
    "lora": _LORA_NAMES, "rslora": _LORA_NAMES, "loraplus": _LORA_NAMES, "qlora": _LORA_NAMES,
    "dora": {**_LORA_NAMES, "magnitude": "lora_magnitude_vector.default.weight"},
    # peft's AdaLoRA names P (out × r) lora_B and Q (r × in) lora_A; Λ is lora_E in both
    "adalora": {"lora_P": "lora_B.default", "lora_E": "lora_E.default", "lora_Q": "lora_A.default"},
    "vera": {"lambda_b": "vera_lambda_b.default", "lambda_d": "vera_lambda_d.default"},
    "ia3": {"scale": "ia3_l.default"},
    "loha": {r: f"{r}.default" for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {r: f"{r}.default" for r in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
}


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #
def exact_names(names: list[str]) -> str:
    """A regex peft full-matches against module names: exactly these modules."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def target_modules(model, targets, layers=None, resolve: Callable | None = None):
    """peft ``target_modules`` for peftlab ``targets`` (and ``layers``) on ``model``.

    ``resolve=None``: the short names through ``MODULE_NAMES`` (a list of suffixes; peft matches a
    module whose name is one of them or ends in ``.`` + one). ``resolve(model, targets, layers)`` ->
    full module names (``peftlab.models.targets.resolve_targets``): a regex of exactly those.
    """
    if resolve is not None:
        return exact_names(resolve(model, targets, layers))
    family = getattr(getattr(model, "config", None), "model_type", None)
    names = MODULE_NAMES.get(family, {})
    if layers is not None or isinstance(targets, str) or not names or any(t not in names for t in targets):
        raise ValueError(f"targets {targets!r} (layers {layers!r}) on a {family!r} model: MODULE_NAMES maps "
                         f"lists of {sorted(names) or 'no'} short names over all layers; pass resolve= for others")
    return [names[t] for t in targets]


def peft_config(name: str, config: Any, model=None, task_type: str | None = None, *,
                total_steps: int | None = None, resolve: Callable | None = None, **overrides):
    """peft's config for the peftlab method ``name`` with ``config``: the same values, the same modules.

    ``model``: the (unadapted) model whose modules are targeted (not needed for prefix / prompt);
    ``task_type``: peft's (None: a plain PeftModel); ``total_steps``: AdaLoRA's budget schedule
    (peft's ``total_step``); ``resolve``: see :func:`target_modules`; ``overrides``: peft fields set
    as given, over the mapped values.
    """
    import peft

    if name not in PEFT_METHODS:
        raise KeyError(f"{name}: no peft counterpart (peft has {', '.join(PEFT_METHODS)})")
    if name == "prompt":
        cls, values = peft.PromptTuningConfig, {"num_virtual_tokens": config.num_virtual_tokens}
    elif name == "prefix":
        cls, values = peft.PrefixTuningConfig, {"num_virtual_tokens": config.num_virtual_tokens,
                                                "prefix_projection": config.prefix_projection,
                                                "encoder_hidden_size": config.encoder_hidden_size}
    else:
        values = {"target_modules": target_modules(model, config.targets, config.layers, resolve)}
        if name in LORA_CONFIGS:
            if config.rank_pattern:
                raise ValueError("rank_pattern is not mapped to peft here")
            cls = peft.LoraConfig
            values.update(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          use_rslora=config.rslora, use_dora=name == "dora",
                          init_lora_weights=True if config.init == "kaiming" else "gaussian")
        elif name == "adalora":
            cls = peft.AdaLoraConfig
            values.update(init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha,
                          lora_dropout=config.dropout, tinit=config.tinit, tfinal=config.tfinal,
                          deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2,
                          orth_reg_weight=config.orth_reg_weight, total_step=total_steps)
        elif name == "vera":
            cls = peft.VeraConfig
            values.update(r=config.r, projection_prng_key=config.projection_prng_key,
                          d_initial=config.d_initial, vera_dropout=config.dropout)
        elif name == "ia3":
            cls = peft.IA3Config
            values.update(feedforward_modules=target_modules(model, config.feedforward, config.layers, resolve))
        elif name == "loha":
            cls = peft.LoHaConfig
            values.update(r=config.r, alpha=config.alpha)
        else:  # lokr
            cls = peft.LoKrConfig
            values.update(r=config.r, alpha=config.alpha, decompose_both=config.decompose_both,
                          decompose_factor=config.decompose_factor)
    return cls(task_type=task_type, **{**values, **overrides})


def peft_model(method, base, task_type: str | None = None, **kwargs):
    """peft's model of ``method`` (a peftlab method: its name and config) on a copy of ``base``, in eval
    mode; ``kwargs`` go to :func:`peft_config` (total_steps, overrides)."""
    import peft

    config = peft_config(method.name, method.config, base, task_type, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


# --------------------------------------------------------------------------- #
# Copying peft's adapter into ours
# --------------------------------------------------------------------------- #
def copy_adapter_weights(ours_model, ours_method, ref_model, adapter_names: dict[str, str] | None = None):
    """Copy peft's (randomly initialized, non-identity) adapter tensors into ours, layer by layer.

    ``adapter_names``: role -> peft name (default ``ADAPTER_NAMES[ours_method.name]``).
    """
    names = ADAPTER_NAMES[ours_method.name] if adapter_names is None else adapter_names
    ref = dict(ref_model.named_parameters())
    with torch.no_grad():
        for module_name, layer in ours_method.layers(ours_model).items():
            for role, param in layer.adapter_parameters().items():
                key = f"base_model.model.{module_name}.{names[role]}"
                param.copy_(ref[key].reshape(param.shape))


@torch.no_grad()
def copy_from_peft(ours_method, ours_model, ref_model) -> None:
    """Make ours hold peft's adapter: layer tensors, the prefix (encoder or P) or the soft prompt."""
    if ours_method.name == "prompt":
        ours_model.soft_prompt.embedding.copy_(ref_model.prompt_encoder["default"].embedding.weight)
    elif ours_method.name == "prefix":
        encoder, theirs = ours_method.encoder(ours_model), ref_model.prompt_encoder["default"]
        if encoder.projection:
            encoder.embedding.copy_(theirs.embedding.weight)
            encoder.transform.load_state_dict(theirs.transform.state_dict())
        else:  # peft: (n, L·2·k) -> ours: (L, 2, n, k)
            layers, _, n, width = encoder.prefix.shape
            encoder.prefix.copy_(theirs.embedding.weight.view(n, layers, 2, width).permute(1, 2, 0, 3))
    else:
        copy_adapter_weights(ours_model, ours_method, ref_model)


def restore_prefix_forward(ref):
    """Let peft's prefix tuning of a sequence classifier run again under transformers 5.24.

    peft 0.21.2 ``PeftModelForSequenceClassification._prefix_tuning_forward``: when the task
    model's ``forward`` has no ``past_key_values`` parameter (BertForSequenceClassification), it calls
    the backbone (``bert``) itself with ``past_key_values=`` and the prefix cache, and first checks
    that ``past_key_values`` is in ``inspect.signature(backbone.forward)``, else raises "Model does
    not support past key values which are required for prefix tuning." transformers renamed that
    parameter ``cache`` (5.24 here; ``past_key_values`` is still accepted, deprecated until 5.40), so the check
    fails although the call would work. This gives the backbone instance a ``forward`` with a
    ``past_key_values`` parameter that hands the cache on as ``cache``: peft's own forward then runs
    unchanged (its prefix encoder, its cache, its mask, pooling, dropout and classifier). A no-op
    where the backbone still names the parameter ``past_key_values`` or peft does not take this path.
    """
    import peft

    classifiers = (peft.PeftModelForSequenceClassification, peft.PeftModelForTokenClassification,
                   peft.PeftModelForQuestionAnswering)  # the task models whose prefix forward calls the backbone
    task_model = ref.base_model
    if not isinstance(ref, classifiers) or "past_key_values" in inspect.signature(task_model.forward).parameters:
        return ref  # peft passes the prefix to the task model itself
    backbone = task_model.get_submodule(ref.transformer_backbone_name)
    parameters = inspect.signature(backbone.forward).parameters
    if "past_key_values" in parameters:
        return ref
    if "cache" not in parameters:
        raise TypeError(f"{type(backbone).__name__}.forward takes neither past_key_values nor cache")
    original = backbone.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    backbone.forward = forward
    return ref


# --------------------------------------------------------------------------- #
# Comparisons the parity tests share
# --------------------------------------------------------------------------- #
def n_trainable_peft(ref) -> int:
    return ref.get_nb_trainable_parameters()[0]


def peft_trainable_without_head(ref) -> int:
    """peft also trains the classifier of a SEQ_CLS model (modules_to_save); peftlab's trainer owns the head."""
    return sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad and "modules_to_save" not in n)


def compare_forward_and_input_grad(ours, ref, base, atol=1e-5):
    """Logits and input-embedding gradients of ours and peft within ``atol`` (fp32), on 2 × 11 tokens."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 11))
    embeds = ours.get_input_embeddings()(ids).detach()
    x1 = embeds.clone().requires_grad_(True)
    x2 = embeds.clone().requires_grad_(True)
    out1 = ours(inputs_embeds=x1).logits
    out2 = ref(inputs_embeds=x2).logits
    torch.testing.assert_close(out1, out2, atol=atol, rtol=0)
    grad_out = torch.randn_like(out1)
    out1.backward(grad_out)
    out2.backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=0)
    with torch.no_grad():  # the adapter really changes the output, so agreement means something
        assert out1.sub(base(inputs_embeds=embeds).logits).abs().max() > 1e-3


def run_with_input_grad(model, embeds, grad_out):
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x).logits
    out.backward(grad_out)
    return out.detach(), x.grad


def assert_matches_peft(ours, ref, base, fp64_adjust=lambda model: None):
    """Outputs and input gradients of ours and peft on the same input.

    fp32: outputs within 1e-5; input gradients within 1e-5 of their largest entry. They are ~50 here
    (RMSNorm divides by the 0.02-scale embedding RMS), where one fp32 ulp is 3.8e-6, so a plain
    1e-5 would fail any change of operation order (the Kronecker and Khatri-Rao forwards reorder
    sums on purpose). fp64: both within 1e-9, so the formulas are the same, not merely close.
    """
    torch.manual_seed(0)
    embeds = base.get_input_embeddings()(torch.randint(0, 128, (2, 11))).detach()
    grad_out = torch.randn(2, 11, 128)
    out1, grad1 = run_with_input_grad(ours, embeds, grad_out)
    out2, grad2 = run_with_input_grad(ref, embeds, grad_out)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad1, grad2, atol=1e-5 * grad2.abs().max().item(), rtol=0)
    with torch.no_grad():  # the adapter really changes the output, so agreement means something
        assert out1.sub(base(inputs_embeds=embeds).logits).abs().max() > 1e-3

    ours64, ref64 = copy.deepcopy(ours).double(), copy.deepcopy(ref).double()
    fp64_adjust(ours64)
    out1, grad1 = run_with_input_grad(ours64, embeds.double(), grad_out.double())
    out2, grad2 = run_with_input_grad(ref64, embeds.double(), grad_out.double())
    torch.testing.assert_close(out1, out2, atol=1e-9, rtol=0)
    torch.testing.assert_close(grad1, grad2, atol=1e-9, rtol=0)


def compare_with_mask(ours, ref, inputs: dict, strip: int = 0, token_types: bool = False, atol: float = 1e-5):
    """Logits (ref's ``strip`` virtual positions dropped) and input-embedding gradients on ``inputs``
    (input_ids and a right-padded attention mask); BERT also with token types 0/1."""
    embeds = ours.get_input_embeddings()(inputs["input_ids"]).detach()
    extra = {"attention_mask": inputs["attention_mask"]}
    if token_types:
        extra["token_type_ids"] = torch.zeros_like(inputs["input_ids"]).index_fill_(1, torch.tensor([5, 6, 7, 8]), 1)
    x1, x2 = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    out1 = ours(inputs_embeds=x1, **extra).logits
    out2 = ref(inputs_embeds=x2, **extra).logits
    out2 = out2[:, strip:] if out2.dim() == 3 else out2
    torch.testing.assert_close(out1, out2, atol=atol, rtol=0)
    grad = torch.randn_like(out1)
    out1.backward(grad)
    out2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=0)
    assert x1.grad.abs().max() > 0
