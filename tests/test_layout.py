"""The package's layers: imports run one way, from the front-ends down to the core.

Each module of ``clex`` belongs to one layer; a module may import its own layer and the ones below it,
never one above (a sibling front-end is not below: training, evaluation and serving do not import each
other). ``clex_vllm`` runs inside vLLM and imports nothing of clex. Every import statement counts, also
those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = {"dynamics", "positions", "rotary", "methods", "composed", "layouts", "models", "hooks", "loading",
        "adapters", "cache", "generation"}
# the rank of each part: 0 base, 1 core (and the package root, the public API), 2 files and data (data may read
# through io, not the other way), 3 the front-ends (which do not import one another), 4 the command line
RANK = {"_moved": 0, "errors": 0, "jsonfile": 0, "": 1, **dict.fromkeys(CORE, 1), "io": 2, "data": 2,
        "training": 3, "eval": 3, "serve": 3, "cli": 4, "__main__": 5,
        "clex_vllm": 0}  # clex_vllm: the serving plugin, which reads the profiles without clex


def part(module: str) -> str:
    """``clex.io.outdir`` → ``io``; ``clex`` itself (the public API) → ``""``."""
    if module.startswith("clex_vllm"):
        return "clex_vllm"
    return module.split(".")[1] if module.count(".") else ""


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "clex").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if f"{target}.{a.name}" in MODULES]
    return [(line, t) for line, t in found if t == "clex" or t.startswith(("clex.", "clex_vllm"))]


MODULES = modules()


def allowed(src: str, dst: str) -> bool:
    a, b = part(src), part(dst)
    if dst == "clex" or a == b or (a, b) == ("data", "io"):
        return True
    return RANK[b] < RANK[a] or RANK[a] == RANK[b] <= 1  # the base and the core are each one layer


def test_every_part_has_a_layer():
    assert {part(m) for m in MODULES} <= set(RANK)


def test_the_core_imports_only_the_core_and_the_base():
    for name, path in MODULES.items():
        if part(name) in CORE:
            bad = [(line, t) for line, t in imports(name, path) if t != "clex" and part(t) not in RANK]
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    bad = [f"line {line}: {t}" for line, t in imports(name, MODULES[name]) if not allowed(name, t)]
    assert not bad, f"{name} imports against the layers: {bad}"


def test_clex_vllm_imports_nothing_of_clex():
    for path in (SRC / "clex_vllm").rglob("*.py"):
        bad = [t for _, t in imports("clex_vllm.x", path) if t == "clex" or t.startswith("clex.")]
        assert not bad, f"{path.name} imports {bad}"


def test_the_check_sees_a_violation():
    assert not allowed("clex.models", "clex.io.outdir")
    assert not allowed("clex.eval.ppl", "clex.training.loop")
    assert not allowed("clex.data.tokens", "clex.cli.main")
    assert allowed("clex.cli.main", "clex.eval.ppl") and allowed("clex.eval.ppl", "clex.data.tokens")


def test_old_module_paths_are_the_new_modules():
    import importlib

    from clex._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import clex.chat

    import clex.data
    import clex.training

    assert clex.chat.DEFAULT_TEMPLATE and clex.chat.ChatSession
    assert clex.data.load_documents and clex.training.CLEXTrainerMixin and clex.training.train
    with pytest.raises(AttributeError, match="clex.training"):
        clex.training.nothing  # noqa: B018
