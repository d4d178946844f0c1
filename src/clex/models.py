"""The one seam into transformers: find a model's rotary module, switch its method, round-trip checkpoints.

A method is switched by writing its ``rope_parameters`` into the model's config and rebuilding the
model's own rotary class from that config, so stock methods run on transformers' own code. CLEX
wraps the rebuilt module in :class:`clex.rotary.CLEXRotary`, which owns the two learned matrices
(``…rotary_emb.clex_ode.up_proj`` / ``down_proj`` in the state dict).

Importing clex registers the ``clex`` and ``ntk`` rope types with transformers and hooks
``PreTrainedModel.post_init`` so that any model whose config says ``rope_type = "clex"`` gets its
CLEX module at construction: ``AutoModelForCausalLM.from_pretrained`` then loads CLEX weights like any
other weight.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import asdict

from torch import nn
from transformers import PreTrainedModel

from clex.cache import install_cache_hook
from clex.composed import SCALED_FROM, base_frequencies, compose, context_length, shipped
from clex.errors import describe
from clex.layouts import UnsupportedModelError, build_rotary, check_family, check_round_trip, rotary_layout
from clex.methods import MethodSpec, get_method, parse_method
from clex.rotary import CLEXConfig, CLEXRotary, clex_modules, inv_freq_buffer, renamed_settings

GLOBAL_LAYER_TYPE = "full_attention"  # models with per-layer-type rope (Gemma 3): CLEX goes here


# --- finding the rotary modules ---------------------------------------------------------------------
def _is_rotary(module: nn.Module) -> bool:
    return isinstance(module, CLEXRotary) or (
        type(module).__name__.endswith("RotaryEmbedding")
        and (hasattr(module, "inv_freq") or any(k.endswith("_inv_freq") for k in module._buffers))
    )


def rotary_modules(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, module)`` for every rotary module of ``model`` (not descending into them)."""
    for name, child in model.named_children():
        if _is_rotary(child):
            yield model, name, child
        else:
            yield from rotary_modules(child)


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_layer_type(config) -> str | None:
    """The key of the rope parameters that CLEX and the baselines change (None: one flat dict)."""
    params = config.rope_parameters or {}
    nested = config.nested_rope_parameter_keys(params)
    if not nested:
        return None
    if GLOBAL_LAYER_TYPE not in nested:
        raise UnsupportedModelError(f"model type {config.model_type!r} has no global ({GLOBAL_LAYER_TYPE!r}) layers in "
                                    f"this config, only {nested}: a window does not grow with the context, so a "
                                    "length method has nothing to scale ('vanilla' keeps the model as "
                                    "shipped)")
    return GLOBAL_LAYER_TYPE


def module_rope(model) -> dict:
    """The rope parameters the methods change: the model's own, or its global layers' (Gemma 3)."""
    return current_rope(text_config(model))


def current_rope(config) -> dict:
    if not getattr(config, "rope_parameters", None):
        raise unsupported(config)
    layer_type = rope_layer_type(config)
    rope = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
    if rope is None:
        raise UnsupportedModelError(f"model type {config.model_type!r}: its {layer_type!r} layers use no rotary "
                                    "embedding (only its local layers rotate, and their window does not grow "
                                    "with the context): nothing for a length method to scale")
    return rope


def unsupported(model_or_config, where=None) -> UnsupportedModelError:
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", type(model_or_config).__name__)
    if getattr(config, "rotary_dim", None):  # GPT-J, CodeGen: rotary computed inside each attention layer
        return UnsupportedModelError(
            (f"{where}: " if where else "") + f"model type {model_type!r} applies its rotary embedding inside each "
            "attention layer, with no rotary module clex can replace; it is not supported"
        )
    return UnsupportedModelError(
        (f"{where}: " if where else "") + f"model type {model_type!r} has no rotary module clex can reach (none, or "
        "one computed inside its attention layers); the families clex supports are listed in docs/families.md"
    )


# --- switching the method ---------------------------------------------------------------------------
def apply(model: PreTrainedModel, method: str, **params) -> PreTrainedModel:
    """Make ``model`` use ``method`` (e.g. ``"clex"``, ``"yarn"`` with ``factor=8``, or ``"yarn:factor=8"``).

    In place; returns the model. A method starts from the model as shipped: on a model whose rope is already
    scaled (Llama 3.x, Qwen with YaRN, Gemma 3, Phi-3 long) it scales the frequencies the model uses, and
    ``vanilla`` is the model as shipped (``clex.composed``). The training length L defaults to the model's
    context (its ``max_position_embeddings``, or factor × original length where its rope says more); pass
    ``original_max_position_embeddings=`` to declare another. Re-applying ``clex`` to a CLEX model keeps its
    learned weights. On bad input nothing changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {describe(model)}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name such as 'clex' or 'yarn:factor=8' (a str), "
                        f"got {describe(method)}")
    name, spec_params = parse_method(method)
    twice = sorted(set(spec_params) & set(params))
    if twice:
        raise ValueError(f"method parameter(s) {twice} given both in {method!r} and as keyword arguments; "
                         "give each once")
    return switch(model, name, {**spec_params, **params}, spec=method)


def switch(model: PreTrainedModel, name: str, params: dict, spec: str | None = None,
           shipped_as: tuple[dict, int] | None = None) -> PreTrainedModel:
    """:func:`apply` with the method already parsed. ``shipped_as`` = ``(rope, max_position_embeddings)``
    overrides what the model counts as shipped (``clex export`` writes stock factors relative to the raw θ)."""
    spec = spec or name
    params = renamed_settings(params) if name == "clex" else params
    found = list(rotary_modules(model))
    if not found:
        raise unsupported(model)
    # Work on a copy of the config: models built from one config object share it, and a failed
    # apply must leave the model as it was.
    new_root = copy.deepcopy(model.config)
    config = text_config(new_root)
    if getattr(config, "head_dim", 0) is None:  # Mixtral & co: stock rope functions read it unguarded
        config.head_dim = config.hidden_size // config.num_attention_heads
    try:
        layer_type = rope_layer_type(config)
        current = current_rope(config)
    except UnsupportedModelError:
        if name == "vanilla" and not params:  # no global rope (sliding-only Gemma 3): the model as shipped
            return model
        raise
    base, base_max = copy.deepcopy(shipped_as or getattr(model, "_clex_shipped", None)
                                   or shipped(current, config.max_position_embeddings))
    L = params.pop("original_max_position_embeddings", None)
    if L is None:
        L = context_length(base, base_max)
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"original_max_position_embeddings must be a positive integer, got {L!r}")
    method = get_method(name)
    if name != "vanilla":
        check_family(config, name, 2 * inv_freq_buffer(found[0][2], layer_type).numel(), current)
    clex_config = None
    if name == "vanilla":
        method.rope_parameters(params, L, current["rope_theta"])  # refuses any parameter
        rope = copy.deepcopy(base)
    else:
        if name == "clex" and current.get("rope_type") == "clex":
            # re-applying CLEX: unspecified settings stay as they are (its field, its t_rule …)
            previous = clex_settings(current, config, L)
            for key, value in asdict(previous).items():
                if key != "original_max_position_embeddings":
                    params.setdefault(key, value)
        elif name == "clex":
            params.setdefault("ode_base", float(current["rope_theta"]))
        rope = method.rope_parameters(params, L, current["rope_theta"])
        if name == "clex":
            clex_config = _clex_config(found[0][2], config, layer_type, rope, L)
            rope = {**clex_config.to_rope_parameters(), "rope_theta": rope["rope_theta"]}
        if "partial_rotary_factor" in current:
            rope["partial_rotary_factor"] = current["partial_rotary_factor"]
        for key in getattr(config, "ignore_keys_at_rope_validation", None) or ():
            if key in current and key not in rope:  # the family's own keys (Ministral 3's llama_4_scaling_beta)
                rope[key] = current[key]
        rope = compose(rope, base, base_max, config.model_type)

    if layer_type:
        config.rope_parameters[layer_type] = rope
    else:
        config.rope_parameters = rope
    if "original_max_position_embeddings" in rope and hasattr(config, "original_max_position_embeddings"):
        # Phi-3 & co keep L at the top level too, and on load it overrides the rope parameters' value
        config.original_max_position_embeddings = rope["original_max_position_embeddings"]
    if name == "vanilla":
        config.max_position_embeddings = base_max if L == context_length(base, base_max) else L
    else:
        config.max_position_embeddings = method.advertised_length(rope, L)
    try:
        config.validate_rope()
    except (KeyError, TypeError) as err:  # the family's own validation (Phi-MoE wants its mscale fields)
        raise UnsupportedModelError(f"method {spec!r} on model type {config.model_type!r}: its config refuses the "
                                    f"method's parameters ({' '.join(str(err).split())[:160]})") from None
    check_round_trip(new_root, spec)

    rebuilt = []
    for _, _, old in found:
        original = old.original if isinstance(old, CLEXRotary) else old
        buffer = next(iter(original.buffers()), None)
        new = build_rotary(type(original), config, buffer.device if buffer is not None else "cpu", spec)
        new = wrap_rotary(new, clex_config, layer_type, previous=old) if clex_config else new
        rebuilt.append(new.train(old.training))  # an eval-mode model stays in eval mode
    # commit: nothing above touched the model
    _replace_config(model, new_root)
    for (parent, attr, _), new in zip(found, rebuilt, strict=True):
        setattr(parent, attr, new)
        if isinstance(new, CLEXRotary):
            install_cache_hook(parent, attr)
    if shipped_as is None:
        model._clex_shipped = (base, base_max)  # the next method again starts from the model as shipped
    return model


def clex_settings(rope: dict, config, L: int) -> CLEXConfig:
    """CLEX's settings from a rope dict, without the keys the family keeps there for its own code."""
    own = set(getattr(config, "ignore_keys_at_rope_validation", None) or ())
    return CLEXConfig.from_rope_parameters({k: v for k, v in rope.items() if k not in own}, L)


def _clex_config(module: nn.Module, config, layer_type: str | None, rope: dict, L: int) -> CLEXConfig:
    """CLEX's settings from ``rope``, refused where the model's rotary layout or width cannot carry them."""
    if "mrope_section" in current_rope(config) or hasattr(getattr(module, "original", module), "mrope_section"):
        raise UnsupportedModelError(f"model type {config.model_type!r} rotates several position axes (multimodal "
                                    "rope sections); CLEX builds one axis, so 'clex' is refused for it (the other "
                                    "methods only change the frequencies)")
    layout = rotary_layout(module, layer_type)
    if layout != "half":
        what = "interleaved pairs (2i, 2i+1)" if layout == "interleaved" else "cos/sin in a layout of its own"
        raise UnsupportedModelError(f"model type {config.model_type!r} rotates {what}; CLEX builds the "
                                    "half-split layout, so 'clex' is refused for it (the other methods only "
                                    "change the frequencies)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * current_rope(config).get("partial_rotary_factor", 1.0))
    if rotary_dim % 2:
        raise ValueError(f"CLEX needs an even rotary dimension, got {rotary_dim} (head_dim × partial_rotary_factor)")
    return CLEXConfig.from_rope_parameters(rope, L)


def _replace_config(model: nn.Module, new_root) -> None:
    """Point every submodule that held the old config at the new one."""
    old = model.config
    mapping = {id(old): new_root, id(text_config(old)): text_config(new_root)}
    for module in model.modules():
        config = getattr(module, "config", None)
        if id(config) in mapping:
            module.config = mapping[id(config)]


def use_method(model: PreTrainedModel, spec: str) -> PreTrainedModel:
    """``apply(model, spec)``, except that a bare ``clex`` on a CLEX model means its learned CLEX (with
    settings, e.g. ``clex:t_rule=continuous``, it is re-applied and keeps its weights)."""
    name, params = parse_method(spec)
    if name == "clex" and clex_modules(model) and not params:
        return model
    return apply(model, spec)


def supported_length(model, spec: str) -> int:
    """How long a context ``model``, switched to ``spec``, is meant for: the method's supported length from the
    model's L, with CLEX's max_factor read from the model (a bare ``clex`` keeps a CLEX model's own)."""
    spec = MethodSpec(spec)
    params = dict(spec.params)
    found = clex_modules(model)
    if spec.name == "clex" and found and "max_factor" not in params:
        params["max_factor"] = found[0].settings.max_factor
    return spec.method.supported_length(params, training_length(model))


def training_length(model_or_config) -> int:
    """The length L of a model: the one a method clex applied starts from (CLEX's training length), else the
    context of the model as shipped (``max_position_embeddings``, or factor × original length where an
    already-scaled rope says more)."""
    config = text_config(model_or_config)
    rope = current_rope(config)
    marker = getattr(model_or_config, "_clex_shipped", None)
    applied = rope.get("rope_type") == "clex" or SCALED_FROM in rope or (marker is not None and rope != marker[0])
    if applied:
        return int(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    return context_length(rope, config.max_position_embeddings)


def wrap_rotary(rotary: nn.Module, config: CLEXConfig, layer_type: str | None, previous=None) -> CLEXRotary:
    device = next(iter(rotary.buffers())).device
    wrapped = CLEXRotary(rotary, config, layer_type).to(device)
    rope = rotary.config.rope_parameters[layer_type] if layer_type else rotary.config.rope_parameters
    base = rope.get(SCALED_FROM) or {}
    if base.get("rope_type") == "longrope":  # at t = 1 the model as shipped: the short set below its L0
        wrapped.keep_short_set(base["original_max_position_embeddings"],
                               lambda device: base_frequencies(rotary.config, layer_type, device, short=True)[0])
    if isinstance(previous, CLEXRotary):
        old = previous.settings
        same_field = (previous.rotary_dim, old.param_factor, old.act, old.ode_base) == (
            wrapped.rotary_dim, config.param_factor, config.act, config.ode_base
        )
        if same_field:
            wrapped.clex_ode.load_state_dict(previous.clex_ode.state_dict())
        else:
            warnings.warn(
                "re-applying CLEX with a different field (param_factor, act or ode_base): the learned "
                "weights do not carry over; starting from the untrained path (NTK, α = 2t − 1)",
                stacklevel=3,
            )
    return wrapped
