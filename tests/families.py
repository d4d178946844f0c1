"""Every rotary family the installed transformers ships, as a tiny random model, and what clex does with each.

``rotary_families()`` enumerates transformers' causal-LM table: a family counts when its default config
carries RoPE (``rope_parameters``, or ``rotary_dim`` for GPT-J-style rotary inside attention). ``check()``
runs every method on a tiny model of it, plain and already scaled (a YaRN block), and returns one
:class:`Outcome` per (family, variant). Used by ``tests/test_every_family.py``; ``python tests/families.py``
writes both families tables of ``docs/families.md`` (the summary and the per-family table) from the same run.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import clex
from clex.layouts import UnsupportedModelError
from clex.loading import causal_lm_class
from clex.models import rotary_modules, training_length

SIZES = dict(
    vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=32, n_embd=64, n_layer=2, n_head=4, d_model=64,
    n_positions=32, num_layers=2, ffn_hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
    sliding_window=16, rotary_dim=8, n_inner=64, topk_group=1, n_group=1, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, mamba_d_state=8, ssm_state_size=8,
    mamba_chunk_size=16,
)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ADAPTIVE = ("vanilla", "clex", "dynamic:factor=2")  # inside the context: the model as shipped
FIXED = ("pi:factor=2", "ntk:factor=2", "yarn:factor=2", "llama3:factor=2", "longrope")
# saved and loaded back, with clex and with plain transformers: CLEX everywhere, a baseline where it composes
RELOADED = {"plain": ("clex",), "scaled": ("clex", "pi:factor=2")}
VARIANTS = ("plain", "scaled")


class NotBuilt(Exception):
    """A family whose tiny model cannot be built from its defaults with small sizes (named with the reason)."""


@dataclass
class Outcome:
    family: str
    variant: str
    applied: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # method -> its one-line refusal
    wrong: list[str] = field(default_factory=list)  # what broke a rule: must stay empty


def rotary_families() -> list[str]:
    """Model types of transformers' causal-LM table whose default config uses RoPE (composite models whose
    text model is itself in the table count once, as that text model)."""
    out = []
    for family in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[family]()
                text = config.get_text_config()
        except Exception:  # noqa: BLE001 - configs that cannot even be built empty (several text configs)
            continue
        if text is not config and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        if getattr(text, "rope_parameters", None) or getattr(text, "rotary_dim", None):
            out.append(family)
    return out


def tiny_model(family: str, scaled: str | None = None, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random fp32 model of ``family`` (eager attention) with ``layers`` layers. Its rope is the family's
    own (any factor brought to 2 over a context of 32), or with ``scaled`` = ``"yarn"`` / ``"longrope"`` a block
    of that type on every layer type."""
    cls = CONFIG_MAPPING[family]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            empty = cls()
            text = empty.get_text_config()
            props = {k for k in dir(type(text)) if isinstance(getattr(type(text), k, None), property)}
            sizes = {k: v for k, v in {**SIZES, **TOKENS}.items() if hasattr(text, k) and k not in props}
            sizes = {k: v for k, v in sizes.items() if k in SIZES or getattr(text, k) is not None}
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in sizes:
                    sizes[key] = layers
            kinds = list(dict.fromkeys(getattr(text, "layer_types", None) or []))
            if len(kinds) > 1 and "layer_types" not in props:  # one layer of each kind (Gemma 3: a global one)
                sizes["layer_types"] = (kinds + [kinds[-1]] * layers)[:max(layers, len(kinds))]
                sizes["num_hidden_layers"] = len(sizes["layer_types"])
            rope = getattr(text, "rope_parameters", None)
            if scaled and not rope:
                raise NotBuilt("no rope parameters to scale (its rotary sits inside attention)")
            if rope:
                sizes["rope_parameters"] = _small_rope(rope, scaled, getattr(text, "partial_rotary_factor", None))
            if text is empty:
                config = cls(**sizes)
            else:
                keys = ("text_config", "language_config", "llm_config")
                key = next(k for k in keys if getattr(empty, k, None) is text)
                config = cls(**{key: type(text)(**sizes).to_dict()})
            config._attn_implementation = "eager"
            torch.manual_seed(seed)
            with torch.device("meta"):
                size = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
            if size > 6_000_000:
                raise NotBuilt(f"{size / 1e6:.0f} M parameters even with small sizes (parts not shrunk)")
            return tf.AutoModelForCausalLM.from_config(config).eval()
    except NotBuilt:
        raise
    except Exception as err:  # noqa: BLE001 - the reason is what the guard reports
        raise NotBuilt(f"{type(err).__name__}: {_stable(' '.join(str(err).split()))[:100]}") from None


def _small_rope(rope: dict, scaled: str | None, partial: float | None) -> dict:
    rope = json.loads(json.dumps(rope))
    context = SIZES["max_position_embeddings"]
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    for target in [rope[k] for k in nested] or [rope]:
        if "original_max_position_embeddings" in target:  # a family that ships scaled: same type, small sizes
            target["original_max_position_embeddings"] = context
        if "factor" in target:
            target["factor"] = 2.0
        if scaled == "yarn":
            target.update(rope_type="yarn", factor=2.0, original_max_position_embeddings=context)
        elif scaled == "longrope":
            pairs = int(SIZES["head_dim"] * (target.get("partial_rotary_factor") or partial or 1.0)) // 2
            target.update(rope_type="longrope", original_max_position_embeddings=context // 2,
                          short_factor=[1.0 + j / pairs for j in range(pairs)],
                          long_factor=[1.0 + 3 * j / pairs for j in range(pairs)])
    return rope


def shipped_model(family: str, variant: str):
    """``(model, L, reference inputs and logits)`` for ``variant`` (``plain`` or ``scaled``: YaRN, else
    LongRoPE where the family takes only that), trying 4 layers where 2 leave no attention layer."""
    reasons = []
    for scaled in [None] if variant == "plain" else ["yarn", "longrope"]:
        for layers in (2, 4):
            try:
                model = tiny_model(family, scaled, layers)
                return model, *_reference(model)
            except NotBuilt as err:
                reasons.append(str(err))
    raise NotBuilt(reasons[0])


def _reference(model):
    try:
        L = training_length(model) if list(rotary_modules(model)) else None
    except UnsupportedModelError:
        L = None
    if L is None:
        return None, None
    if L > 4 * SIZES["max_position_embeddings"]:
        raise NotBuilt(f"context {L} after setting max_position_embeddings: the family reads its length elsewhere")
    inside, beyond = torch.randint(0, 64, (1, min(L, 24))), torch.randint(0, 64, (1, 2 * L + 8))
    try:
        reference = {"inside": (inside, _logits(model, inside)), "beyond": (beyond, _logits(model, beyond))}
    except Exception as err:  # noqa: BLE001 - the family needs inputs of its own (images, audio …)
        why = f"{type(err).__name__}: {_stable(str(err))[:100]}"
        raise NotBuilt(f"the unmodified model's forward fails: {why}") from None
    try:
        probe = clex.apply(_twin(model), "pi:factor=2")
    except (UnsupportedModelError, ValueError):
        return L, reference
    if torch.equal(_logits(probe, beyond), reference["beyond"][1]):  # hybrids: no attention layer at this depth
        raise NotBuilt("no layer uses the rotary embedding at this depth")
    return L, reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def _twin(model):
    return copy.deepcopy(model)


def _apply(model, spec: str):
    if spec != "longrope" or not list(rotary_modules(model)):
        return clex.apply(model, spec.replace("longrope", "longrope:long_factor=2"))
    module = next(m for _, _, m in rotary_modules(model))
    pairs = next(b for b in getattr(module, "original", module).buffers()).numel()
    return clex.apply(model, "longrope", long_factor=[2.0] * pairs, short_factor=[1.0] * pairs)


def check(family: str, variant: str) -> Outcome:
    """Every method on a tiny ``family`` model: applied and right, or refused in one line."""
    out = Outcome(family, variant)
    shipped, L, reference = shipped_model(family, variant)
    if L is None:  # no rotary module clex can reach, or none on the layers a length method scales
        for spec in (*ADAPTIVE, *FIXED):
            try:
                _apply(_twin(shipped), spec)
                if spec == "vanilla":  # the model as shipped
                    out.applied.append(spec)
                else:
                    out.wrong.append(f"{spec}: accepted on a model with nothing to scale")
            except UnsupportedModelError as err:
                out.refused[spec.partition(":")[0]] = str(err)
        return out
    for spec in (*ADAPTIVE, *FIXED):
        name = spec.partition(":")[0]
        model = _twin(shipped)
        try:
            _apply(model, spec)
        except (UnsupportedModelError, ValueError) as err:
            text = str(err)
            if "\n" in text or not text:
                out.wrong.append(f"{name}: refusal is not one line: {text[:200]!r}")
            out.refused[name] = text
            continue
        except Exception as err:  # noqa: BLE001 - a crash at apply is exactly what the guard catches
            out.wrong.append(f"{name}: apply crashed: {type(err).__name__}: {str(err)[:200]}")
            continue
        try:
            _check_applied(out, name, spec, model, reference, spec in RELOADED[variant])
        except Exception as err:  # noqa: BLE001
            out.wrong.append(f"{name}: accepted, then the forward failed: {type(err).__name__}: {str(err)[:200]}")
    return out


def _check_applied(out: Outcome, name: str, spec: str, model, reference, reload: bool) -> None:
    out.applied.append(name)
    (inside, inside_logits), (beyond, beyond_logits) = reference["inside"], reference["beyond"]
    if spec in ADAPTIVE:
        diff = (_logits(model, inside) - inside_logits).abs().max().item()
        if diff > 1e-6:
            out.wrong.append(f"{name}: changes the logits inside the model's context by {diff:.2e}")
    if name != "vanilla" and torch.equal(_logits(model, beyond), beyond_logits):
        out.wrong.append(f"{name}: the logits beyond the context do not change")
    if reload:
        if name == "clex":
            with torch.no_grad():
                for module in clex.clex_modules(model):
                    module.clex_ode.down_proj.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        expected = _logits(model, beyond)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            for load in (clex.from_pretrained, causal_lm_class(model.config).from_pretrained):
                again = load(tmp, attn_implementation="eager").eval()
                diff = (_logits(again, beyond) - expected).abs().max().item()
                if diff > 1e-6:
                    out.wrong.append(f"{name}: reloads with {diff:.2e} difference ({load.__module__})")


def table(outcomes: list[Outcome], not_built: dict[str, str]) -> str:
    """``docs/families.md``'s table: one row per family and variant, with clex's refusal where there is one."""
    rows = ["| family | rope | methods applied | refused (the first line of the refusal) |", "|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: (o.family, VARIANTS.index(o.variant))):
        refused = "; ".join(f"{m}: {_short(why)}" for m, why in sorted(o.refused.items()) if m == "clex" or
                            "clex" not in o.refused or why != o.refused["clex"])
        rows.append(f"| {o.family} | {o.variant} | {', '.join(o.applied) or 'none'} | {refused or '—'} |")
    for name, why in sorted(not_built.items()):
        family, variant = name.rstrip(")").split(" (")
        rows.append(f"| {family} | {variant} | not built by the guard | {_short(why)} |")
    return "\n".join(rows)


def summary(outcomes: list[Outcome], not_built: dict[str, str]) -> str:
    """``docs/families.md``'s summary: families grouped by what clex does on them as shipped and already scaled."""
    cells: dict[str, dict[str, str]] = {}
    for o in outcomes:
        cells.setdefault(o.family, {})[o.variant] = _cell(o)
    for name in not_built:
        family, variant = name.rstrip(")").split(" (")
        cells.setdefault(family, {})[variant] = "not built by the guard"
    groups: dict[tuple[str, str], list[str]] = {}
    for family, by_variant in cells.items():
        key = tuple(by_variant.get(v, "not built by the guard") for v in VARIANTS)
        groups.setdefault(key, []).append(family)
    rows = ["| as shipped | already scaled | families |", "|---|---|---|"]
    for (plain, scaled), families in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        rows.append(f"| {plain} | {scaled} | {', '.join(sorted(families))} |")
    return "\n".join(rows)


def _short(text: str) -> str:
    return _stable(text).replace("|", "/")[:140]


def _stable(text: str) -> str:
    """``text`` with any set's items sorted: their order changes from one process to the next."""
    return re.sub(r"\{('[^{}]*')\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", text)


def _cell(o: Outcome) -> str:
    if not o.applied:
        return "refused"
    if o.applied == ["vanilla"]:
        return "vanilla only (the rest refused)"
    if "clex" in o.applied:
        return "all methods" if not o.refused else "all but " + ", ".join(sorted(o.refused))
    return "baselines only (clex refused)"


def all_outcomes() -> tuple[list[Outcome], dict[str, str]]:
    outcomes, not_built = [], {}
    for family in rotary_families():
        for variant in VARIANTS:
            try:
                outcomes.append(check(family, variant))
            except NotBuilt as err:
                not_built[f"{family} ({variant})"] = str(err)
    return outcomes, not_built


def write_block(path, text: str, name: str = "table") -> None:
    """Replace the ``families <name>`` block of ``path`` with ``text``."""
    from pathlib import Path

    path = Path(path)
    start, end = f"<!-- families {name}: start -->", f"<!-- families {name}: end -->"
    body = path.read_text()
    new = re.sub(re.escape(start) + r"\n.*?\n" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", body,
                 flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    results, missing = all_outcomes()
    root = Path(__file__).resolve().parents[1]
    write_block(root / "docs" / "families.md", summary(results, missing), "summary")
    write_block(root / "docs" / "families.md", table(results, missing))
    print(summary(results, missing))
    for o in results:
        for line in o.wrong:
            print(f"WRONG {o.family} {o.variant}: {line}", file=sys.stderr)
