"""The one seam into transformers: find a model's rotary module, switch its method, round-trip checkpoints.

A method is switched by writing its ``rope_parameters`` into the model's config and rebuilding the
model's own rotary class from that config, so stock methods run on transformers' own code. CLEX
wraps the rebuilt module in :class:`clex.rotary.ClexRotary`, which owns the two learned matrices
(``…rotary_emb.clex_ode.up_proj`` / ``down_proj`` in the state dict).

Importing clex registers the ``clex`` and ``ntk`` rope types with transformers and hooks
``PreTrainedModel.post_init`` so that any model whose config says ``rope_type = "clex"`` gets its
CLEX module at construction: ``AutoModelForCausalLM.from_pretrained`` then loads CLEX weights like any
other weight.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .cache import install_cache_hook
from .composed import SCALED_FROM, CompositionError, base_frequencies, compose, context_length, shipped
from .composed import install as install_composition
from .dynamics import CLEXDynamics
from .jsonfile import JSONFileError, read_json
from .layouts import UnsupportedModelError, build_rotary, check_family, check_round_trip, rotary_layout
from .methods import get_method, parse_method, register_with_transformers
from .rotary import CLEXConfig, ClexRotary, clex_modules

GLOBAL_LAYER_TYPE = "full_attention"  # models with per-layer-type rope (Gemma 3): CLEX goes here
REFERENCE_UP, REFERENCE_DOWN = "clex_layer.proj_func.ode_up_proj", "clex_layer.proj_func.ode_down_proj"


class ModelLoadError(ValueError):
    """A model directory whose config or weights cannot be read; the message names the file."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path that does not exist (also a FileNotFoundError, so either ``except`` catches it)."""


def describe(value) -> str:
    """A value as an argument error shows it: its type, and short values themselves."""
    if value is None:
        return "None"
    if isinstance(value, (str, bytes, int, float, bool)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
    return type(value).__name__


def check_number(name: str, value, ok, rule: str, integer: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number (an integer where ``integer``; None where ``optional``) that ``ok`` accepts,
    else one refusal in the argument's name saying ``rule``: TypeError for another kind of value, ValueError
    for one out of range."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {rule}, got {describe(value)}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


# --- finding the rotary modules ---------------------------------------------------------------------
def _is_rotary(module: nn.Module) -> bool:
    return isinstance(module, ClexRotary) or (
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


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_layer_type(config) -> str | None:
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
    return _current_rope(_text_config(model))


def _current_rope(config) -> dict:
    if not getattr(config, "rope_parameters", None):
        raise _unsupported(config)
    layer_type = _rope_layer_type(config)
    rope = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
    if rope is None:
        raise UnsupportedModelError(f"model type {config.model_type!r}: its {layer_type!r} layers use no rotary "
                                    "embedding (only its local layers rotate, and their window does not grow "
                                    "with the context): nothing for a length method to scale")
    return rope


def _unsupported(model_or_config, where=None) -> UnsupportedModelError:
    config = _text_config(model_or_config)
    model_type = getattr(config, "model_type", type(model_or_config).__name__)
    if getattr(config, "rotary_dim", None):  # GPT-J, CodeGen: rotary computed inside each attention layer
        return UnsupportedModelError(
            (f"{where}: " if where else "") + f"model type {model_type!r} applies its rotary embedding inside each "
            "attention layer, with no rotary module clex can replace; it is not supported"
        )
    return UnsupportedModelError(
        (f"{where}: " if where else "") + f"model type {model_type!r} has no rotary module clex can reach (none, or "
        "one computed inside its attention layers); the families clex supports are listed in its README"
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
    found = list(rotary_modules(model))
    if not found:
        raise _unsupported(model)
    # Work on a copy of the config: models built from one config object share it, and a failed
    # apply must leave the model as it was.
    new_root = copy.deepcopy(model.config)
    config = _text_config(new_root)
    if getattr(config, "head_dim", 0) is None:  # Mixtral & co: stock rope functions read it unguarded
        config.head_dim = config.hidden_size // config.num_attention_heads
    try:
        layer_type = _rope_layer_type(config)
        current = _current_rope(config)
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
        check_family(config, name, 2 * _theta(found[0][2], layer_type).numel(), current)
    clex_config = None
    if name == "vanilla":
        method.rope_parameters(params, L, current["rope_theta"])  # refuses any parameter
        rope = copy.deepcopy(base)
    else:
        if name == "clex" and current.get("rope_type") == "clex":
            # re-applying CLEX: unspecified settings stay as they are (its field, its t policy …)
            previous = _clex_settings(current, config, L)
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
        try:
            rope = compose(rope, base, base_max, config.model_type)
        except CompositionError as err:
            raise UnsupportedModelError(str(err)) from None

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
        config.max_position_embeddings = method.extended_length(rope, L) if method.extended_length else L
    try:
        config.validate_rope()
    except (KeyError, TypeError) as err:  # the family's own validation (Phi-MoE wants its mscale fields)
        raise UnsupportedModelError(f"method {spec!r} on model type {config.model_type!r}: its config refuses the "
                                    f"method's parameters ({' '.join(str(err).split())[:160]})") from None
    check_round_trip(new_root, spec)

    rebuilt = []
    for _, _, old in found:
        original = old.original if isinstance(old, ClexRotary) else old
        buffer = next(iter(original.buffers()), None)
        new = build_rotary(type(original), config, buffer.device if buffer is not None else "cpu", spec)
        new = _wrap(new, clex_config, layer_type, previous=old) if clex_config else new
        rebuilt.append(new.train(old.training))  # an eval-mode model stays in eval mode
    # commit: nothing above touched the model
    _replace_config(model, new_root)
    for (parent, attr, _), new in zip(found, rebuilt, strict=True):
        setattr(parent, attr, new)
        if isinstance(new, ClexRotary):
            install_cache_hook(parent, attr)
    if shipped_as is None:
        model._clex_shipped = (base, base_max)  # the next method again starts from the model as shipped
    return model


def _clex_settings(rope: dict, config, L: int) -> CLEXConfig:
    """CLEX's settings from a rope dict, without the keys the family keeps there for its own code."""
    own = set(getattr(config, "ignore_keys_at_rope_validation", None) or ())
    return CLEXConfig.from_rope_parameters({k: v for k, v in rope.items() if k not in own}, L)


def _theta(module: nn.Module, layer_type: str | None) -> torch.Tensor:
    """The θ buffer of a rotary module (of ``layer_type``'s layers where it keeps one per type)."""
    module = getattr(module, "original", module)
    named = getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq", None)
    return named if torch.is_tensor(named) else next(iter(module.buffers()))


def _clex_config(module: nn.Module, config, layer_type: str | None, rope: dict, L: int) -> CLEXConfig:
    """CLEX's settings from ``rope``, refused where the model's rotary layout or width cannot carry them."""
    if "mrope_section" in _current_rope(config) or hasattr(getattr(module, "original", module), "mrope_section"):
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
    rotary_dim = int(head_dim * _current_rope(config).get("partial_rotary_factor", 1.0))
    if rotary_dim % 2:
        raise ValueError(f"CLEX needs an even rotary dimension, got {rotary_dim} (head_dim × partial_rotary_factor)")
    return CLEXConfig.from_rope_parameters(rope, L)


def _replace_config(model: nn.Module, new_root) -> None:
    """Point every submodule that held the old config at the new one."""
    old = model.config
    mapping = {id(old): new_root, id(_text_config(old)): _text_config(new_root)}
    for module in model.modules():
        config = getattr(module, "config", None)
        if id(config) in mapping:
            module.config = mapping[id(config)]


def use_method(model: PreTrainedModel, spec: str) -> PreTrainedModel:
    """``apply(model, spec)``, except that a bare ``clex`` on a CLEX model means its learned CLEX (with
    settings, e.g. ``clex:policy=continuous``, it is re-applied and keeps its weights)."""
    name, params = parse_method(spec)
    if name == "clex" and clex_modules(model) and not params:
        return model
    return apply(model, spec)


def training_length(model_or_config) -> int:
    """The length L of a model: the one a method clex applied starts from (CLEX's training length), else the
    context of the model as shipped (``max_position_embeddings``, or factor × original length where an
    already-scaled rope says more)."""
    config = _text_config(model_or_config)
    rope = _current_rope(config)
    marker = getattr(model_or_config, "_clex_shipped", None)
    applied = rope.get("rope_type") == "clex" or SCALED_FROM in rope or (marker is not None and rope != marker[0])
    if applied:
        return int(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    return context_length(rope, config.max_position_embeddings)


def check_model_path(path) -> None:
    """A clear error for a local model directory that does not exist, before the hub would read the path as a
    malformed repo id. A path is local when it starts with ``.``, ``/`` or ``~``, or has more separators than a
    hub name (``name`` or ``org/name``) has; hub names pass."""
    text = str(path)
    backslash = os.sep != "/" and os.sep in text  # Windows: hub names never hold one
    local = text.startswith((".", "/", "~")) or text.count("/") > 1 or backslash
    if local and not os.path.exists(os.path.expanduser(text)):
        raise ModelNotFoundError(f"no model directory at {text}: the path does not exist")


def _wrap(rotary: nn.Module, config: CLEXConfig, layer_type: str | None, previous=None) -> ClexRotary:
    device = next(iter(rotary.buffers())).device
    wrapped = ClexRotary(rotary, config, layer_type).to(device)
    rope = rotary.config.rope_parameters[layer_type] if layer_type else rotary.config.rope_parameters
    base = rope.get(SCALED_FROM) or {}
    if base.get("rope_type") == "longrope":  # at t = 1 the model as shipped: the short set below its L0
        wrapped.keep_short_set(base["original_max_position_embeddings"],
                               lambda device: base_frequencies(rotary.config, layer_type, device, short=True)[0])
    if isinstance(previous, ClexRotary):
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


# --- construction hook: configs that say "clex" get their module at model init ----------------------
def _install_from_config(model: PreTrainedModel) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "rope_parameters"):
        return
    try:
        config = _text_config(model)
        layer_type = _rope_layer_type(config)
    except (UnsupportedModelError, AttributeError, TypeError):
        return
    rope = (config.rope_parameters or {}).get(layer_type) if layer_type else config.rope_parameters
    if not rope or rope.get("rope_type", rope.get("type")) != "clex":
        return
    clex_config = _clex_settings(rope, config, config.max_position_embeddings)
    rope.update(clex_config.to_rope_parameters())  # saved configs carry every setting, defaults included
    for parent, attr, module in rotary_modules(model):
        if not isinstance(module, ClexRotary):
            setattr(parent, attr, _wrap(module, clex_config, layer_type))
            install_cache_hook(parent, attr)


def _patch_transformers() -> None:
    """Hooks installed once on import (idempotent)."""
    register_with_transformers()
    install_composition()
    if getattr(PreTrainedModel, "_clex_patched", False):
        return
    original_post_init = PreTrainedModel.post_init
    original_init_weights = PreTrainedModel._init_weights
    original_checkpointing = PreTrainedModel._activation_checkpointing_enable

    @functools.wraps(original_post_init)
    def post_init(self, *args, **kwargs):
        _install_from_config(self)
        result = original_post_init(self, *args, **kwargs)
        if clex_modules(self):  # load CLEX weights in fp32 even when the model loads in bf16/fp16
            self._keep_in_fp32_modules_strict = {*(self._keep_in_fp32_modules_strict or ()), "clex_ode"}
        return result

    @functools.wraps(original_init_weights)
    def _init_weights(self, module):
        if isinstance(module, CLEXDynamics):  # CLEX weights missing from a checkpoint: the reference init
            module.reset_parameters()
            return
        return original_init_weights(self, module)

    @functools.wraps(original_checkpointing)
    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        # Reentrant checkpointing drops gradients of inputs passed by keyword (the cos/sin that carry
        # CLEX's gradients) and breaks with peft: force the non-reentrant variant on CLEX models.
        if clex_modules(self):
            activation_checkpointing_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        return original_checkpointing(self, activation_checkpointing_kwargs, *args, **kwargs)

    _accept_registered_rope_types()
    PreTrainedModel.post_init = post_init
    PreTrainedModel._init_weights = _init_weights
    PreTrainedModel._activation_checkpointing_enable = _activation_checkpointing_enable
    PreTrainedModel._clex_patched = True


def _accept_registered_rope_types() -> None:
    """Phi-3-style configs refuse every rope type but their own; let them take any registered one."""
    from transformers import Phi3Config, PhimoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

    for cls in (Phi3Config, PhimoeConfig):
        own = cls.validate_rope

        def validate_rope(self, _own=own):
            rope_type = (self.rope_parameters or {}).get("rope_type")
            if rope_type in ROPE_INIT_FUNCTIONS and rope_type != "longrope":
                return RotaryEmbeddingConfigMixin.validate_rope(self)
            return _own(self)

        cls.validate_rope = validate_rope
        # configs are strict dataclasses that also keep their validators in a list
        validators = getattr(cls, "__class_validators__", None)
        if validators is not None:
            validators[:] = [validate_rope if v is own else v for v in validators]


# --- loading ----------------------------------------------------------------------------------------
def from_pretrained(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a causal LM saved by clex, by the CLEX reference code, or any supported model.

    Reference checkpoints (``rope_scaling = {"type": "clex", …}``, weights under
    ``model.clex_layer.proj_func``) are converted on the fly: their matrices are transposed into
    ``clex_ode`` and their top-level ``log_scale`` moves into the rope parameters.
    Never runs remote code; weights load from safetensors.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"path must be a model directory or a hub name (str or os.PathLike), "
                        f"got {describe(path)}")
    if not str(path).strip():
        raise ValueError("path is empty; give a model directory or a hub name")
    check_model_path(path)
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelLoadError(f"{path} is a file, not a model directory (a folder with config.json and weights)")
    if kwargs.get("trust_remote_code"):
        raise ValueError("clex.from_pretrained never runs remote code (trust_remote_code=True refused)")
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from .adapters import from_adapter

        return from_adapter(path, **kwargs)
    config = kwargs.pop("config", None) or load_config(path)
    text = _text_config(config)
    if not getattr(text, "rope_parameters", None):
        raise _unsupported(text, where=path)
    files = _weight_files(path)
    rope = _current_rope(text)
    reference = _reference_weights(path, files) if rope.get("rope_type") == "clex" else None
    if reference is not None and "log_scale" not in rope:
        rope["log_scale"] = bool(getattr(text, "log_scale", False))
    if reference is not None:
        _reference_layout(rope, path)
    kwargs.setdefault("use_safetensors", True)
    if rope.get("rope_type") == "clex" and reference is None:  # CLEX shapes checked before transformers reports
        problem = _mismatch(path, config, files, only="clex_ode")
        if problem:
            raise ModelLoadError(problem)
    try:
        model = causal_lm_class(config).from_pretrained(path, config=config, **kwargs)
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise ModelLoadError(_mismatch(path, config, files) or str(err).splitlines()[0]) from None
    if reference is not None:  # the reference stores both matrices transposed
        _set_clex_weights(model, reference[REFERENCE_UP].T, reference[REFERENCE_DOWN].T)
    for module in clex_modules(model):
        if not module.clex_ode.parameters_finite():
            raise ValueError(f"{path}: CLEX weights (clex_ode.up_proj / down_proj) contain NaN or inf")
    if not list(rotary_modules(model)):
        raise _unsupported(model)
    return model


def causal_lm_class(config):
    """``AutoModelForCausalLM``, or the class the config names where the auto table has no entry for its type
    (the text model of a composite, e.g. ``Emu3ForCausalLM`` with ``Emu3TextConfig``)."""
    import transformers

    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is type(config):
            return cls
    return AutoModelForCausalLM


def load_config(path):
    """The model's config; invalid rope parameters (a CLEX ``max_factor`` of 0, say) name the file."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path} has no config.json: it is not a model directory")
    if os.path.isdir(path):
        _json_file(os.path.join(path, "config.json"))  # bounded first: transformers' own reader is not
    try:
        return AutoConfig.from_pretrained(path)
    except StrictDataclassClassValidationError as err:
        cause = err.__cause__ or err
        raise ModelLoadError(f"{os.path.join(path, 'config.json')}: invalid rope parameters: {cause}") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{os.path.join(path, 'config.json')} is not valid JSON ({err})") from None
    except OSError as err:
        if os.path.exists(path):
            raise
        first = " ".join(str(err).split("\n")[0].split())
        raise ModelNotFoundError(f"{path} is no model directory here, and the hub could not give it "
                                 f"({first})") from None


def _json_file(file: str) -> dict:
    """A JSON object from the model directory, read with clex's size and depth limits (named when bad)."""
    try:
        return read_json(file)
    except JSONFileError as err:
        raise ModelLoadError(str(err)) from None


def _weight_files(path) -> list[str]:
    """The safetensors files of a local model, each header checked (a truncated or garbage file is named)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(path):
        return []
    index = os.path.join(path, "model.safetensors.index.json")
    try:
        if os.path.exists(index):
            files = sorted(set(_json_file(index)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{index} is not a valid weight index ({err})") from None
    for file in files:
        where = os.path.join(path, file)
        if not os.path.isfile(where):
            raise ModelLoadError(f"{where} is missing (named in {os.path.basename(index)})")
        try:
            with safe_open(where, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{where} is not a readable safetensors file ({err}); it is truncated or "
                                 "damaged: save or copy the model again") from None
    return files


def _mismatch(path, config, files: list[str], only: str = "") -> str | None:
    """Which saved tensors (whose names contain ``only``) do not have the shape the config asks for."""
    from safetensors import safe_open

    with torch.device("meta"):
        cls = causal_lm_class(config)
        built = cls.from_config(config) if cls is AutoModelForCausalLM else cls._from_config(config)
        expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    wrong = []
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if only in key and key in expected and expected[key] != shape:
                    wrong.append(f"{key} in {file} is {list(shape)}, the config needs {list(expected[key])}")
    return f"{path}: weights do not fit the model's config: {'; '.join(wrong[:3])}" if wrong else None


def _set_clex_weights(model: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
    """Copy W_up (k·d × d/2) and W_down (d/2 × k·d) into every CLEX module of ``model``, in fp32 whatever the
    model's dtype (weights missing from a checkpoint are created in the load dtype, bf16 say)."""
    with torch.no_grad():
        for module in clex_modules(model):
            for param, value in ((module.clex_ode.up_proj, up), (module.clex_ode.down_proj, down)):
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                param.copy_(value)


def _reference_layout(rope: dict, path) -> None:
    """The reference's first config layout has neither ``act`` nor ``time_dt``: that version used SiLU and RK4
    steps of 0.01, so read it as that (our defaults, tanh and 0.2, would give other frequencies)."""
    missing = [key for key in ("act", "time_dt") if key not in rope]
    if len(missing) == 2:
        rope["act"], rope["time_dt"] = "silu", 0.01
    elif missing:
        have = ({"act", "time_dt"} - set(missing)).pop()
        raise ModelLoadError(f"{path}: the reference's rope_scaling has {have!r} but not {missing[0]!r} (its "
                             f"versions write both or neither); add {missing[0]!r} to config.json")


def _reference_weights(path, files: list[str]) -> dict[str, torch.Tensor] | None:
    """The reference's two CLEX matrices if ``path`` holds them, else None."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in f.keys():
                for suffix in (REFERENCE_UP, REFERENCE_DOWN):
                    if key.endswith(suffix):
                        found[suffix] = f.get_tensor(key).float()
    return found if len(found) == 2 else None


_patch_transformers()
