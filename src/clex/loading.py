"""Loading a model from disk: clex checkpoints, the CLEX reference's checkpoints and plain models.

Never runs remote code and reads weights from safetensors only. Reference checkpoints are converted as
they load (their matrices transposed into ``clex_ode``); a config or weight file that cannot be read
gets ``ModelLoadError`` naming the file.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from clex.errors import DamagedFile, describe
from clex.jsonfile import JSONFileError, read_json
from clex.models import current_rope, rotary_modules, text_config, unsupported
from clex.rotary import clex_modules

REFERENCE_UP, REFERENCE_DOWN = "clex_layer.proj_func.ode_up_proj", "clex_layer.proj_func.ode_down_proj"


ModelLoadError = DamagedFile  # a model directory whose config or weights cannot be read


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path that does not exist (also a FileNotFoundError, so either ``except`` catches it)."""


def is_local_path(text: str) -> bool:
    """Whether ``text`` can only be a local path: it starts with ``.``, ``/`` or ``~``, or has more separators
    than a hub name (``name`` or ``org/name``) has. ``dir/model`` stays ambiguous and is tried on disk first."""
    backslash = os.sep != "/" and os.sep in text  # Windows: hub names never hold one
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or backslash


def check_model_path(path) -> None:
    """A clear error for a local model directory that does not exist, before the hub would read the path as a
    malformed repo id. A path is local when it starts with ``.``, ``/`` or ``~``, or has more separators than a
    hub name (``name`` or ``org/name``) has; hub names pass."""
    text = str(path)
    if is_local_path(text) and not os.path.exists(os.path.expanduser(text)):
        raise ModelNotFoundError(f"no model directory at {text}: the path does not exist")


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
        from clex.adapters import from_adapter

        return from_adapter(path, **kwargs)
    config = kwargs.pop("config", None) or load_config(path)
    text = text_config(config)
    if not getattr(text, "rope_parameters", None):
        raise unsupported(text, where=path)
    files = _weight_files(path)
    rope = current_rope(text)
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
        raise unsupported(model)
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
    """The model's config (for a LoRA run, its base model's, whose training length the run keeps); invalid rope
    parameters (a CLEX ``max_factor`` of 0, say) name the file."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from clex.adapters import adapter_base

        path = adapter_base(path)
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
