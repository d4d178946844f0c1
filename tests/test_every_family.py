"""The family guard: every rotary family the installed transformers ships, plain and already scaled, gets every
method applied and right or refused in one line (``tests/families.py`` says what "right" checks). A new
transformers release then shows at once which families broke, and the two families tables of
``docs/families.md`` are compared with what this run finds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from families import VARIANTS, NotBuilt, Outcome, check, rotary_families, summary, table

ROOT = Path(__file__).resolve().parents[1]
# (family, variant) whose tiny model the guard cannot build from the family's defaults, with why: a family that
# starts or stops building fails the test below, so this list stays what the installed transformers does.
NOT_BUILT = {
    ("bamba", "plain"): "no layer uses the rotary embedding",
    ("bamba", "scaled"): "no layer uses the rotary embedding",
    ("blt", "plain"): "parameters even with small sizes",
    ("blt", "scaled"): "parameters even with small sizes",
    ("codegen", "scaled"): "no rope parameters to scale",
    ("dbrx", "plain"): "DbrxAttentionConfig",
    ("dbrx", "scaled"): "DbrxAttentionConfig",
    ("dots3_note_text", "plain"): "per-layer attribute",
    ("dots3_note_text", "scaled"): "per-layer attribute",
    ("gemma3n_text", "plain"): "layer types producing a cache",
    ("gemma3n_text", "scaled"): "layer types producing a cache",
    ("gemma4_text", "plain"): "per-layer attribute",
    ("gemma4_text", "scaled"): "per-layer attribute",
    ("gemma4_unified_text", "plain"): "per-layer attribute",
    ("gemma4_unified_text", "scaled"): "per-layer attribute",
    ("gptj", "scaled"): "no rope parameters to scale",
    ("lfm2_moe", "plain"): "'NoneType' object is not subscriptable",
    ("lfm2_moe", "scaled"): "'NoneType' object is not subscriptable",
    ("lfm3", "scaled"): "forward fails",
    ("mimo_v2_flash", "plain"): "forward fails",
    ("mimo_v2_flash", "scaled"): "broadcast",
    ("phi4_multimodal", "plain"): "parameters even with small sizes",
    ("phi4_multimodal", "scaled"): "Missing required keys",
    ("phimoe", "scaled"): "short_mscale",
    ("qwen4_exp_text", "plain"): "unsupported operand",
    ("qwen4_exp_text", "scaled"): "unsupported operand",
    ("recurrent_gemma", "plain"): "layers_block_type",
    ("recurrent_gemma", "scaled"): "max_position_embeddings",
    ("zaya", "plain"): "ZAYA currently supports",
    ("zaya", "scaled"): "ZAYA currently supports",
}
FAMILIES = rotary_families()
SEEN: dict[tuple[str, str], Outcome | str] = {}  # what each case found, for the tables


def _run(family: str, variant: str) -> Outcome | str:
    if (family, variant) not in SEEN:
        try:
            SEEN[family, variant] = check(family, variant)
        except NotBuilt as err:
            SEEN[family, variant] = str(err)
    return SEEN[family, variant]


def test_the_guard_sees_the_families_people_extend():
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox",
                   "cohere2", "gpt_oss", "deepseek_v3", "granite", "smollm3", "gptj"):
        assert family in FAMILIES
    assert "gpt2" not in FAMILIES and "bloom" not in FAMILIES  # no rotary embedding


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_is_applied_and_right_or_refused_in_one_line(family, variant):
    found = _run(family, variant)
    if isinstance(found, str):
        expected = NOT_BUILT.get((family, variant))
        assert expected is not None, f"{family} ({variant}) no longer builds as a tiny model: {found}"
        assert expected in found, f"{family} ({variant}) fails to build for another reason now: {found}"
        return
    assert (family, variant) not in NOT_BUILT, f"{family} ({variant}) builds now: remove it from NOT_BUILT"
    assert not found.wrong, "\n".join(found.wrong)
    for method, why in found.refused.items():
        assert why and "\n" not in why, f"{method}: {why!r}"
    if variant == "plain" and found.applied:
        assert "vanilla" in found.applied  # the model as shipped is always available


def _tables() -> tuple[str, str]:
    outcomes, not_built = [], {}
    for family in FAMILIES:
        for variant in VARIANTS:
            found = _run(family, variant)
            if isinstance(found, str):
                not_built[f"{family} ({variant})"] = found
            else:
                outcomes.append(found)
    return summary(outcomes, not_built), table(outcomes, not_built)


def _block(path: Path, name: str = "table") -> str:
    match = re.search(rf"<!-- families {name}: start -->\n(.*?)\n<!-- families {name}: end -->", path.read_text(), re.S)
    assert match, f"{path} has no families {name} block"
    return match.group(1)


@pytest.mark.slow  # runs the whole guard (reused from the test above when that ran first)
def test_the_families_tables_are_what_the_guard_finds():
    short, full = _tables()
    page = ROOT / "docs" / "families.md"
    assert _block(page, "summary") == short, "regenerate: python tests/families.py"
    assert _block(page) == full, "regenerate: python tests/families.py"
