"""What every evaluation shares: its arguments checked the same way (methods, lengths, device, dtype, positive
counts), each refusal naming the argument, and the model under each method."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from clex import data as D
from clex.errors import describe
from clex.loading import check_model_path, from_pretrained, load_config
from clex.methods import MethodSpec, declare_length, split_methods
from clex.models import use_method


# --- models per method ----------------------------------------------------------------------------
def _load(model_or_path, dtype: torch.dtype, device: str):
    if isinstance(model_or_path, (str, Path)):
        model = from_pretrained(model_or_path, dtype=dtype, attn_implementation="sdpa")
    else:
        model = copy.deepcopy(model_or_path).to(dtype)
    return model.to(device).eval()


def model_for_method(model_or_path, spec: str, dtype: torch.dtype, device: str):
    """A fresh model using ``spec``. ``clex`` on a CLEX-trained model keeps its learned CLEX (with any
    settings given, e.g. ``clex:t_rule=continuous``); on a plain model it is untrained CLEX."""
    return use_method(_load(model_or_path, dtype, device), spec)


def model_tokenizer_config(model, tokenizer: str | None):
    """(tokenizer, config) of a model directory or object, with one clear error for a bad directory.
    Model objects default to the byte tokenizer (the demo's models)."""
    if isinstance(model, (str, Path)):
        check_model_path(model)
        try:
            config = load_config(model)
        except (OSError, ValueError) as err:
            first_line = str(err).splitlines()[0][:200]
            raise D.DataError(f"could not load a model config from {model!r}: {first_line}") from err
        return D.load_tokenizer(tokenizer or str(model)), config
    return D.load_tokenizer(tokenizer or "bytes"), model.config


# --- the arguments the evaluations share ---------------------------------------------------------
def argument_error(name: str, text: str) -> D.DataError:
    """``DataError("`<name>` <text>")``: the argument named as Python spells it (the CLI puts its flag there)."""
    return D.DataError(f"`{name}` {text}")


def check_model_arg(model) -> None:
    """``model`` is a model directory, a hub name or a model object."""
    if not isinstance(model, (str, Path, torch.nn.Module)):
        raise TypeError(f"model must be a model directory or hub name (str or Path) or a model (torch.nn.Module), "
                        f"got {describe(model)}")


def method_list(methods: str | Sequence[str], base_length: int | None = None) -> list[MethodSpec]:
    """``methods`` as a list of checked specs (unknown or malformed ones refused before any work), each with the
    declared training length ``base_length`` where one is given. One string is read as ``methods`` is: one
    method (``"yarn:factor=8,beta_fast=32"``) or several (``"vanilla,clex"``)."""
    if isinstance(methods, str):
        specs = split_methods(methods)
    elif isinstance(methods, Iterable) and not isinstance(methods, (bytes, dict)):
        for spec in methods:
            if not isinstance(spec, str):
                raise TypeError(f"methods must hold method names such as 'vanilla' or 'yarn:factor=8' (str), got "
                                f"{describe(spec)}")
        specs = [MethodSpec(spec) for spec in methods]
    else:
        raise TypeError(f"methods must be a list of method names such as ['vanilla', 'yarn:factor=8'], got "
                        f"{describe(methods)}")
    if not specs:
        raise argument_error("methods", "is empty; give at least one method, e.g. vanilla or yarn:factor=8")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise argument_error("methods", f"lists {twice[0]!r} twice; give each method once")
    return [MethodSpec(declare_length(spec, base_length)) for spec in specs]


def length_list(lengths: int | str | Sequence[int | str]) -> list[int]:
    """``lengths`` as sorted distinct token counts: integers or strings with a k suffix (``"4k"``); one
    integer or string is read as ``lengths`` is (``2048``, ``"1k,2k"``)."""
    if isinstance(lengths, str):
        items: list = [x for x in lengths.split(",") if x.strip()]
    elif isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        items = [lengths]
    elif isinstance(lengths, Iterable) and not isinstance(lengths, (bytes, dict)):
        items = list(lengths)
    else:
        raise TypeError(f"lengths must be a list of lengths in tokens such as [1024, '4k'], got {describe(lengths)}")
    out = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (numbers.Integral, str)):
            raise TypeError(f"lengths must hold lengths in tokens (int, or str such as '4k'), got {describe(item)}")
        n = D.parse_length(item) if isinstance(item, str) else int(item)
        if n < 2:
            raise argument_error("lengths", f"holds {item!r}; a length must be at least 2 tokens")
        out.add(n)
    if not out:
        raise argument_error("lengths", "is empty; give at least one length in tokens, e.g. 1024 or '4k'")
    return sorted(out)


def resolve_device(device: str | torch.device | None) -> str:
    """The device an evaluation runs on (default: cuda when available, else cpu); one clear error for a
    device that does not exist here."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str such as 'cpu', 'cuda' or 'cuda:1', got {describe(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise argument_error("device", f"{device!r} is not supported; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argument_error("device", f"{device}: CUDA is not available here (torch {torch.__version__} sees "
                                 "no GPU); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argument_error("device", f"{device}: only {torch.cuda.device_count()} CUDA device(s) here "
                                 f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
        return str(dev)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argument_error("device", f"{device}: MPS is not available here; use cpu")
        return "mps"
    raise argument_error("device", f"{device!r} is not supported; use cpu, cuda or cuda:N")


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """``value`` must be an integer >= 1 (or None where ``allow_none``): refused before any work, naming the
    argument ``name`` (``batch_size``; the CLI turns it into its flag)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {describe(value)}")
    if value < 1:
        raise argument_error(name, f"must be an integer >= 1, got {value!r}")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_of(name: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(name, str) or name not in DTYPES:
        raise argument_error("dtype", f"must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
