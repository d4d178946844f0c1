"""The examples of README.md and docs/*.md, held to the code.

Every fenced block of those pages is one of:

- ```python: run as written, in a fresh working directory holding small stand-ins for the files the examples
  name (``path/to/model`` and ``runs/clex`` are tiny random Llamas with a tokenizer; ``train.txt``,
  ``prompt.txt``, ``chats.jsonl``, ``records.jsonl``);
- ```bash / ```sh / ```shell: each command line is parsed. A ``clex …`` line (also after ``-m clex`` in an
  ``accelerate launch`` or ``torch.distributed.run`` line) must name existing subcommands, flags and flag choices,
  read from ``clex <subcommand> --help`` (``clex.cli.main``, in this process); the cheap ones run for real
  (:data:`RUN`, some shortened by :data:`SHORTENED`). A ``make`` line must name Makefile targets, a
  ``pip install`` line extras that pyproject.toml defines, a ``python script.py`` line a file of the repository;
  any other line is an error unless its program is in :data:`EXTERNAL`;
- ```json: must parse.

A block that cannot run carries ``<!-- not run: reason -->`` on the line before it; :data:`NOT_RUN` lists every
such block, so none is skipped unseen. ``docs/serving.md`` is written by ``make test-engines``: only its
``clex`` lines are checked there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = {"docs/serving.md"}  # written by `make test-engines`: its clex lines are checked, nothing else
SHELL = {"bash", "sh", "shell"}

# Every block marked `<!-- not run: … -->`, as (page, reason): a new marker must be added here, on purpose.
NOT_RUN = {
    ("docs/export.md", "installs vLLM and starts a server"),
    ("docs/export.md", "compiles llama.cpp"),
}
# Programs the pages call that clex does not install; their lines are not checked.
EXTERNAL = {"vllm": "vLLM, in its own environment (docs/export.md)"}

# clex command lines that run for real in the test, by the words they start with.
RUN = [("methods",), ("info",), ("generate",), ("export",), ("train",)]
# Run shortened: these flags are replaced (or added) so that the run takes seconds on the stand-in model.
SHORTENED = {("train",): {"--steps": "2", "--batch-size": "1", "--grad-accum": "1", "--train-length": "64",
                          "--save-every": "0"}}

def _clex():
    import clex

    return clex


# --- the blocks ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Block:
    page: str
    line: int  # of the opening fence
    lang: str
    text: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(\w*)", lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = re.fullmatch(r"\s*<!--\s*not run:\s*(.+?)\s*-->\s*", before)
        out.append(Block(str(path.relative_to(ROOT)), start + 1, match.group(1).lower(), "\n".join(body) + "\n",
                         marker.group(1) if marker else None))
        i += 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang == "python" and not b.not_run]
SHELL_BLOCKS = [b for b in ALL if b.lang in SHELL and not b.not_run]


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """``(line, words)`` of each command of a shell block: continuation lines joined, comments dropped."""
    out, pending, first = [], "", 0
    for n, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if not pending:
            first = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + raw, comments=True)
        pending = ""
        if words:
            out.append((first, words))
    return out


# --- clex's parsers, read from its --help ----------------------------------------------------------------------
_HELP: dict[tuple[str, ...], str] = {}


def run_clex(argv: list[str]) -> tuple[int, str, str]:
    """``clex ARGV`` in this process: (exit status, stdout, stderr)."""
    from clex.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _help(path: tuple[str, ...]) -> str:
    if path not in _HELP:
        code, out, err = run_clex([*path, "--help"])
        assert code == 0, f"clex {' '.join(path)} --help failed: {err.strip()}"
        _HELP[path] = out
    return _HELP[path]


def _usage_choices(help_text: str) -> set[str]:
    """The subcommands (or positional choices) that the usage line offers in braces."""
    usage = help_text.split("\n\n")[0]
    usage = re.sub(r"--?[\w-]+ \{[^}]*\}", "", usage)  # a flag's own choices are not subcommands
    return {c for group in re.findall(r"\{([^}]*)\}", usage) for c in group.split(",")}


def _flags(help_text: str) -> dict[str, set[str] | None]:
    """Each flag of a help text, with its choices when it has some."""
    flags: dict[str, set[str] | None] = {}
    for flag, choices in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?: \{([^}]*)\})?", help_text):
        if flags.get(flag) is None:
            flags[flag] = set(choices.split(",")) if choices else None
    return flags


def check_clex(words: list[str]) -> tuple[str, ...]:
    """Check one ``clex`` command line (``words`` after ``clex``) against clex's parsers; returns its subcommand
    path."""
    path: tuple[str, ...] = ()
    rest = list(words)
    while rest and not rest[0].startswith("-") and rest[0] in _usage_choices(_help(path)):
        path, rest = (*path, rest[0]), rest[1:]
    assert path or rest[:1] in (["--help"], ["-h"]), f"`clex {' '.join(words)}`: no such subcommand {rest[:1]}"
    flags = _flags(_help(path))
    for i, word in enumerate(rest):
        if word == "…":
            break  # the rest of the line is left out on purpose
        if not word.startswith("-") or re.fullmatch(r"-\d.*", word):
            continue
        flag = word.split("=", 1)[0]
        assert flag in flags, f"`clex {' '.join(words)}`: {' '.join(path)} has no flag {flag}"
        choices = flags[flag]
        if choices is not None:
            value = word.split("=", 1)[1] if "=" in word else (rest[i + 1] if i + 1 < len(rest) else "")
            assert value in choices, f"`clex {' '.join(words)}`: {flag} {value!r} is not one of {sorted(choices)}"
    return path


def clex_words(words: list[str]) -> list[str] | None:
    """The words after ``clex`` of a line that runs clex (directly or as ``-m clex``), else None."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before the program
        words = words[1:]
    if words[:1] == ["clex"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "clex":
            return words[i + 2 :]
    return None


# --- the stand-ins ---------------------------------------------------------------------------------------------
TEXT = ("The State of the Union is strong. Congress shall make no law. We the people of the nation seek peace, "
        "and the pass key is 41852. ") * 40
CHATS = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
L = 64  # the stand-in models' context


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>", "</s>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT, *(json.dumps(c) for c in CHATS)], bpe)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A directory of the files the examples name; each test works in a copy of it."""
    import clex
    from tiny import tiny_llama

    root = tmp_path_factory.mktemp("stand-ins")
    tok = _tokenizer()
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=L, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    for where in ("path/to/model", "runs/clex"):
        (root / where).mkdir(parents=True)
        tok.save_pretrained(root / where)
    model.save_pretrained(root / "path/to/model")
    clex.apply(model, "clex", max_factor=16).save_pretrained(root / "runs/clex")
    (root / "train.txt").write_text(TEXT)
    (root / "prompt.txt").write_text("The State of the Union")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    record = {"input": "What is the pass key?", "context": TEXT, "answers": ["41852"], "all_classes": None,
              "length": 200, "dataset": "passage_retrieval_en"}
    (root / "records.jsonl").write_text(json.dumps(record) + "\n")
    return root


@pytest.fixture
def workdir(stand_ins, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(stand_ins, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return work


# --- the tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example_runs_as_written(block, workdir):
    source = block.text
    code = compile(source, f"{block.id} (python example)", "exec")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__docs_example__"})


COMMANDS = [(b, n, words) for b in SHELL_BLOCKS for n, words in commands(b)]


def _case(block, line: int, words: list[str]):
    """One shell line; a `clex train` line that runs (a shortened training) is marked slow."""
    trains = words[:1] == ["clex"] and clex_words(words)[:1] == ["train"]
    return pytest.param(block, line, words, id=f"{block.page}:{line}", marks=[pytest.mark.slow] if trains else [])


@pytest.mark.parametrize("block,line,words", [_case(*c) for c in COMMANDS])
def test_shell_line_names_what_exists(block, line, words, workdir):
    words = list(words)
    argv = clex_words(words)
    if argv is not None:
        path = check_clex(argv)
        _check_repo_paths(words)
        if words[0] == "clex" and any(path[: len(r)] == r for r in RUN):
            _run(path, argv)
        return
    if block.page in GENERATED:
        return
    program = Path(words[0]).name
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        missing = [w for w in words[1:] if not w.startswith("-") and "=" not in w and w not in targets]
        assert not missing, f"{block.page}:{line}: no Makefile target {missing}"
    elif program in ("pip", "pip3") and words[1:2] == ["install"]:
        extras = _extras()
        for word in words[2:]:
            found = re.fullmatch(r"(?:\.|clex-llm)\[([^\]]*)\]", word)
            if found:
                unknown = set(found.group(1).split(",")) - extras
                assert not unknown, f"{block.page}:{line}: pyproject.toml has no extra {sorted(unknown)}"
    elif program in ("python", "python3") and words[1:2] and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{block.page}:{line}: no file {words[1]}"
    else:
        why = "not a clex, make, pip or python line: mark the block `<!-- not run: reason -->`, or add it to EXTERNAL"
        assert program in EXTERNAL, f"{block.page}:{line}: `{' '.join(words)}` is {why}"


def _extras() -> set[str]:
    """The extras pyproject.toml defines (read without tomllib, which Python 3.10 lacks)."""
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", (ROOT / "pyproject.toml").read_text(),
                        re.S | re.M)
    return set(re.findall(r"^([\w-]+)\s*=", section.group(1), re.M))


def _check_repo_paths(words: list[str]) -> None:
    for flag, value in zip(words, words[1:], strict=False):
        if flag in ("--config_file", "--config-file"):
            assert (ROOT / value).is_file(), f"no file {value} (`{' '.join(words)}`)"


def _run(path: tuple[str, ...], argv: list[str]) -> None:
    argv = list(argv)
    for key, changes in SHORTENED.items():
        if path[: len(key)] == key:
            for flag, value in changes.items():
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
    if path == ("train",) and "--out" in argv:  # the run makes the model that later examples read as a stand-in
        shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
    code, out, err = run_clex(argv)
    assert code == 0, f"`clex {' '.join(argv)}` exited {code}: {err.strip()[-2000:]}"


def test_json_examples_parse():
    for block in (b for b in ALL if b.lang == "json"):
        try:
            json.loads(block.text)
        except json.JSONDecodeError:
            for line in filter(str.strip, block.text.splitlines()):
                json.loads(line)  # JSON Lines


def test_blocks_marked_not_run_are_the_listed_ones():
    marked = {(b.page, b.not_run) for b in ALL if b.not_run}
    assert marked == NOT_RUN, f"marked not run: {sorted(marked)}; NOT_RUN lists {sorted(NOT_RUN)}"
    print(f"not run ({len(marked)}): " + "; ".join(f"{p}: {why}" for p, why in sorted(marked)), file=sys.stderr)


def test_every_page_has_checked_examples():
    assert PYTHON and COMMANDS
    pages = {b.page for b in PYTHON} | {b.page for b, _, _ in COMMANDS}
    assert "README.md" in pages and "docs/training.md" in pages


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_between_pages_resolve():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#:]+\.md)(?:#([^)]*))?\)", page.read_text()):
            where = page.parent / target
            assert where.is_file(), f"{page.relative_to(ROOT)} links to missing {target}"
            assert not anchor or anchor in _anchors(where), f"{page.relative_to(ROOT)}: no #{anchor} in {target}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
