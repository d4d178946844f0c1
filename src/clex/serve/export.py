"""Export learned CLEX frequencies to the stock ``longrope`` rope type (``clex export``).

At a fixed t = T, CLEX's frequencies are per-pair rescalings of the raw θ (``rope_theta``): θ_j(T) = θ_j / λ_j.
The ``longrope`` rope type carries exactly that — ``long_factor = λ`` beyond the original length L,
``short_factor = θ / θ(1)`` within it (1 on a plain model; on an already-scaled one, Llama 3.x say, its own
scaling, which CLEX keeps at t = 1; a Phi-3-long base's own short set below its original length is not kept) — and
transformers, vLLM and SGLang read it without clex installed. What is lost: t no longer adapts. At
lengths in ((T−1)·L, T·L] the exported model computes what the CLEX model computes; between L and
(T−1)·L it uses θ(T) where CLEX would use a smaller t, and vLLM uses ``long_factor`` at every
position whenever it serves more than L tokens.

transformers reads the cos/sin scale from ``attention_factor``; vLLM reads ``short_mscale`` and
``long_mscale`` (both otherwise default to √(1 + ln(T)/ln L), which CLEX does not use), so all three
are written.

What keeps t adapting: a ``longrope`` export also carries ``clex_profiles`` (L, T, θ(1) … θ(T), the scale; see
:mod:`clex_vllm.profiles`), from which clex's vLLM plugin serves each request at its own t in one instance.
Engines without the plugin ignore the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from clex.composed import SCALED_FROM
from clex.errors import BadInput
from clex.io.atomic import atomic_dir
from clex.io.outdir import check_outside
from clex.loading import check_model_path, from_pretrained, load_config
from clex.methods import plain_inv_freq
from clex.models import module_rope, switch, training_length
from clex.rotary import clex_modules
from clex_vllm.profiles import CONFIG_KEY as PROFILES_KEY
from clex_vllm.profiles import FORMAT as PROFILES_FORMAT

EXPORT_FORMATS = ("longrope", "gguf")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


ExportError = BadInput  # the name export code raises


def longrope_parameters(model, factor: int) -> dict:
    """The ``longrope`` parameters that reproduce ``model``'s CLEX at t = ``factor``."""
    modules = clex_modules(model)
    if not modules:
        rope = model.config.get_text_config().rope_parameters
        raise ExportError(f"the model does not use CLEX (its rope parameters: {rope}); nothing to export")
    module = modules[0]
    cfg = module.settings
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ExportError(f"`factor` must be an integer t >= 1, got {factor!r}")
    if factor > cfg.max_factor:
        raise ExportError(f"`factor` {factor} exceeds the model's CLEX max_factor {cfg.max_factor}")
    if cfg.log_scale:
        raise ExportError("the model uses log_scale (attention scaled by ln n / ln L per length); longrope "
                          "has one fixed scale, so the export would not reproduce it")
    with torch.no_grad():
        theta = module.trajectory()[factor - 1].double()
        base = module._base_inv_freq().double()
    # stock longrope divides the raw θ (rope_theta) by its factors; on an already-scaled model CLEX's t = 1 is the
    # shipped θ_b, so the short factors carry θ / θ_b (1 on a plain model) and the long ones θ / θ(T)
    raw = plain_inv_freq(module_rope(model)["rope_theta"], module.rotary_dim, "cpu").double()
    scale = module._attention_scaling()
    return {"long_factor": (raw / theta.cpu()).tolist(), "short_factor": (raw / base.cpu()).tolist(),
            "factor": float(factor), "attention_factor": scale, "short_mscale": scale,
            "long_mscale": scale}


def no_profiles_reason(rope: dict) -> str:
    """Why a CLEX rope (its rope parameters) cannot be served at per-request integer t; empty when it can."""
    t_rule = rope.get("t_rule", rope.get("policy", "ceil"))
    if t_rule != "ceil":
        return (f"the model's CLEX t_rule is {t_rule!r}: its t is not an integer, and the profiles serve "
                "t = 1 … T")
    if (rope.get(SCALED_FROM) or {}).get("rope_type") == "longrope":
        return "the model keeps a LongRoPE base's short set below its original length, which no profile holds"
    return ""


def serving_profiles(model, factor: int) -> dict | None:
    """The ``clex_profiles`` entry (L, T, θ(1) … θ(T), the cos/sin scale) that lets an engine with clex's plugin
    serve each request at its own t; None where per-request t would not reproduce the CLEX model."""
    if no_profiles_reason(module_rope(model)):
        return None
    module = clex_modules(model)[0]
    with torch.no_grad():
        inv = [module.frequencies(float(t)).detach().cpu().float().tolist() for t in range(1, factor + 1)]
    return {"format": PROFILES_FORMAT, "L": module.settings.original_max_position_embeddings, "T": factor,
            "inv_freq": inv, "attention_scaling": module._attention_scaling()}


def export(model_dir: str | Path, out: str | Path, to: str = "longrope", factor: int | None = None,
           outtype: str | None = None) -> Path:
    """Write the CLEX model in ``model_dir`` at t = ``factor`` as a stock-transformers checkpoint (``longrope``:
    a directory) or a llama.cpp file (``gguf``: ``out`` ends in .gguf; ``outtype`` f32 (default), f16 or q8_0).

    Every refusal comes before any work; a failure later leaves nothing behind (no temporary directory)."""
    if to not in EXPORT_FORMATS:
        raise ExportError(f"`to` must be one of {EXPORT_FORMATS}, got {to!r}")
    if outtype is not None and to != "gguf":
        raise ExportError(f"`outtype` {outtype!r} applies only to `to` gguf; a {to} export keeps the model's weights "
                          "as they are")
    if factor is None:
        raise ExportError("`factor` T is required: the exported model uses CLEX's frequencies at t = T")
    check_model_path(model_dir)
    out = Path(out)
    if out.is_symlink():  # a link (dangling or not) would be written through, or fail only after the conversion
        raise ExportError(f"{out} is a symbolic link (to {os.readlink(out)}); export writes a new path, never "
                          "through a link: choose another output path")
    outtype = outtype or "f32"
    check_outside(out, model_dir)
    if to == "gguf":
        from clex.serve.gguf import GGUF_TYPES, check_family, write_gguf

        if out.suffix != ".gguf":
            raise ExportError(f"`to` gguf writes one file: `out` must end in .gguf, got {out}")
        if out.exists():
            raise ExportError(f"{out} exists; choose a new `out`")
        if not out.parent.is_dir():
            raise ExportError(f"the folder of `out`, {out.parent}, does not exist")
        if outtype not in GGUF_TYPES:
            raise ExportError(f"`outtype` must be one of {GGUF_TYPES}, got {outtype!r}")
    elif out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new `out`")
    model = from_pretrained(model_dir)
    if to == "gguf":
        check_family(model.config.get_text_config())
    rope = longrope_parameters(model, factor)
    profiles = serving_profiles(model, factor) if to == "longrope" else None
    plain = {k: v for k, v in module_rope(model).items() if k in ("rope_theta", "partial_rotary_factor")}
    switch(model, "longrope", rope, shipped_as=({"rope_type": "default", **plain}, training_length(model)))
    if to == "gguf":
        return write_gguf(model, model_dir, out, model.config.rope_parameters, outtype)
    if profiles is not None:  # read by clex's vLLM plugin; engines without it ignore the key
        setattr(model.config, PROFILES_KEY, profiles)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for pattern in TOKENIZER_FILES:
            for item in Path(model_dir).glob(pattern):
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)

    return atomic_dir(out, fill)  # out is missing or empty (checked above)


def serving_hint(model_dir: str | Path, factor: int, to: str = "longrope", out: str | Path | None = None) -> str:
    """:func:`serving_settings` for the model in ``model_dir`` (its training length L from its config), and, for a
    ``longrope`` export at ``out``, how to serve it at each request's own t with clex's vLLM plugin."""
    from clex.jsonfile import read_json

    config = load_config(model_dir)
    L = training_length(config)
    hint = serving_settings(L, factor, to)
    if to != "longrope" or out is None or factor == 1:
        return hint
    if PROFILES_KEY not in read_json(Path(out) / "config.json"):
        why = no_profiles_reason(module_rope(config))
        return f"{hint}\nno per-request t for it: {why}" if why else hint
    return (f"{hint}\nserve each request at its own t (1 … {factor}, from prompt + max_tokens) in one vLLM with "
            f"clex's plugin (installed with clex; into vLLM's own environment: pip install --no-deps clex-llm):\n"
            f"  vllm serve {out} --max-model-len {factor * L}")


def serving_settings(L: int, factor: int, to: str = "longrope") -> str:
    """What to tell the engine so that the export computes what CLEX computes (measured: docs/serving.md)."""
    lo, hi = (factor - 1) * L, factor * L
    if factor == 1:
        return f"equal to the CLEX model at every length up to L = {L} (t = 1 is the original rope)"
    if to == "gguf":
        return (f"equal to the CLEX model at lengths {lo} < n <= {hi} when llama.cpp runs with n_ctx in "
                f"({L}, {hi}] (e.g. -c {hi}; any n_ctx > {L} applies the T = {factor} factors at every position, "
                f"so shorter prompts are served at t = {factor}); for prompts up to {L} tokens run a second "
                f"context with -c {L}")
    return (f"equal to the CLEX model at lengths {lo} < n <= {hi}; vLLM without clex's plugin: --max-model-len "
            f"{hi} (the most it accepts: prompt + max_tokens <= {hi}); any max_model_len > {L} applies long_factor at "
            f"every position, so shorter prompts are served at t = {factor}: for prompts up to {L} tokens serve it "
            f"with --max-model-len {L}")
