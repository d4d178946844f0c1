"""Every bad file or flag a user gives clex is refused in one line that names it (and its line or record) and
says what is wrong: exit 2, never a traceback, never an "unexpected" failure, never a silent wrong result.

Each class of case runs through the command line (``clex.cli.main`` in-process) and, where a library function
is the public entry, through it too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import transformers as tf

from clex import data as D
from clex.data import chat as C
from clex.eval import longbench as LB
from clex.io.cachedir import cache_root
from clex.serve import chat as S
from test_safety_eval import cli, save_tiny

NOT_UTF8 = "\u017c\u00f3\u0142w".encode("cp1250")  # Polish in a Windows code page: first byte 0xbf
DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hostile") / "model")


def refusal(capsys, argv: list, *fragments: str) -> str:
    """Run ``argv``: exit 2 and exactly one line on stderr, holding every fragment."""
    code, _, err = cli(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "(unexpected" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def ppl(model: Path, data: Path, out: Path) -> list:
    return ["eval", "ppl", "--model", model, "--methods", "vanilla", "--lengths", "32", "--data", data,
            "--tokenizer", "bytes", "--samples", "1", "--no-progress", "--out", out]


def train_chat(model: Path, data: Path, out: Path, tokenizer: str | Path = "bytes") -> list:
    return ["train", "--model", model, "--method", "vanilla", "--format", "chat", "--data", data, "--tokenizer",
            tokenizer, "--steps", "1", "--batch-size", "1", "--no-progress", "--out", out]


def longbench(model: Path, data: Path, out: Path, *extra, tokenizer: str | Path = "bytes") -> list:
    return ["eval", "longbench", "--model", model, "--methods", "vanilla", "--lengths", "128", "--tokenizer",
            tokenizer, "--data", data, "--no-progress", "--out", out, *extra]


# --- 1. data that is not UTF-8 --------------------------------------------------------------------------------
def _non_utf8_source(tmp: Path, kind: str) -> tuple[Path, Path, str]:
    """(source to pass, the file at fault, its line)."""
    if kind == "txt":
        path = tmp / "notes.txt"
        path.write_bytes(b"fine first line\n" + NOT_UTF8 + b" more\n")
        return path, path, "2"
    if kind == "jsonl":
        path = tmp / "docs.jsonl"
        path.write_bytes(b'{"text": "ok"}\n\n{"text": "' + NOT_UTF8 + b'"}\n')
        return path, path, "3"
    folder = tmp / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("all good " * 20)
    (folder / "b.txt").write_bytes(NOT_UTF8)
    return folder, folder / "b.txt", "1"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "folder"])
def test_data_that_is_not_utf8_is_named_with_its_line(model, tmp_path, capsys, kind):
    source, culprit, line = _non_utf8_source(tmp_path, kind)
    with pytest.raises(D.DataError, match=rf"^{culprit}:{line}: not UTF-8 text \(byte 0xbf at column \d+\)"):
        D.load_documents(str(source))
    refusal(capsys, ppl(model, source, tmp_path / "out"), f"{culprit}:{line}: not UTF-8 text", "save it as UTF-8")
    assert not (tmp_path / "out").exists()


# --- 2. prompt files, chat input and chat records that are not UTF-8 ------------------------------------------
def test_a_binary_prompt_file_is_named(model, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"Hello\n\x00\xff\xfe binary")
    argv = ["generate", "--model", model, "--tokenizer", "bytes", "--max-new-tokens", "2", "--prompt-file"]
    refusal(capsys, [*argv, prompt], f"{prompt}:2: not UTF-8 text (byte 0xff at column 2)")
    refusal(capsys, [*argv, tmp_path / "missing.txt"], f"prompt file {tmp_path / 'missing.txt'} not found")
    refusal(capsys, [*argv, tmp_path], f"prompt file {tmp_path} is a folder")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_binary_stdin_is_named_by_its_line(model, capsys, monkeypatch, command):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello\n" + NOT_UTF8 + b"\n"), encoding="utf-8"))
    argv = [command, "--model", model, "--tokenizer", "bytes", "--max-new-tokens", "2"]
    argv += ["--prompt-file", "-"] if command == "generate" else ["--max-context", "200"]
    refusal(capsys, argv, "stdin:2: not UTF-8 text (byte 0xbf at column 1); send UTF-8 text")


@pytest.mark.parametrize(
    "line,message",
    [(b'{"messages": "' + NOT_UTF8 + b'"}', "chat.jsonl:2: not UTF-8 text (byte 0xbf at column 15)"),
     (b'{"messages": ' + DEEP.encode() + b"}", "chat.jsonl:2: nests deeper than 64 levels"),
     (b"[1, 2]", "chat.jsonl:2: a record must be a JSON object with a 'messages' field, got a list"),
     (b'{"messages": null}', "chat.jsonl:2: 'messages' must be a non-empty list of {role, content}, got null"),
     (b'{"messages": ["hi"]}', "chat.jsonl:2: message 0 must have 'role' and 'content', got a string"),
     (b'{"messages": [{"role": 1, "content": "x"}]}', "chat.jsonl:2: message 0 field 'role' must be a string"),
     (b'{"messages": [{"role": "user", "content": null}]}',
      "chat.jsonl:2: message 0 field 'content' must be a string, got null")],
    ids=["not-utf8", "deep", "list", "messages-null", "message-string", "role-number", "content-null"],
)
def test_bad_chat_records_are_named_and_can_be_skipped(model, tmp_path, capsys, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD_CHAT.encode() + b"\n" + line + b"\n")
    with pytest.raises(C.ChatDataError) as err:
        C.load_conversations(str(path))
    assert str(err.value).startswith(f"{tmp_path}/{message}")
    stats = C.ChatStats()
    with pytest.warns(UserWarning, match="skipped"):
        assert len(C.load_conversations(str(path), "skip", stats)) == 1 and stats.skipped == 1
    refusal(capsys, train_chat(model, path, tmp_path / "run"), f"{tmp_path}/{message}")
    assert not (tmp_path / "run").exists()


# --- 3. chat templates that fail ------------------------------------------------------------------------------
def save_tokenizer(path: Path, template: str) -> Path:
    """A word-level tokenizer (a few ids, so any tiny model takes them) whose chat template is ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "user": 2, "assistant": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="[UNK]")
    tok.chat_template = template
    tok.save_pretrained(path)
    assert (path / "chat_template.jinja").read_text() == template  # the file a user edits
    return path


GOOD_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
TEMPLATES = {  # name → (template, what the one line says after "chat_template.jinja:")
    "syntax": ("{% for m in messages %}\n{{ m['role'] }}\n{{ m['content'] }\n{% endfor %}",
               "3: the chat template does not parse: unexpected '}'"),
    "raises": ("{% for m in messages %}\n{% if m['role'] == 'user' %}{{ raise_exception('users may not speak') }}"
               "{% endif %}{% endfor %}", "2: the chat template raised an error: users may not speak"),
    "undefined-name": ("{{ messages[0]['content'] }}\n{{ bos_token_of_another_model() }}",
                       "2: the chat template uses an undefined name or field: 'bos_token_of_another_model' is "
                       "undefined"),
    "undefined-field": ("{% for m in messages %}\n\n{{ m.meta.author }}{% endfor %}",
                        "3: the chat template uses an undefined name or field: 'dict object' has no attribute 'meta'"),
    "python-error": ("{{ messages | length / 0 }}",
                     "1: the chat template failed (ZeroDivisionError): division by zero"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_failing_chat_template_is_named_with_its_line(model, tmp_path, capsys, monkeypatch, name):
    template, message = TEMPLATES[name]
    tok_dir = save_tokenizer(tmp_path / "tok", template)
    expected = f"{tok_dir / 'chat_template.jinja'}:{message}"
    tok = D.load_tokenizer(str(tok_dir))
    with pytest.raises(C.ChatTemplateError) as err:
        C.prompt_ids(tok, [{"role": "user", "content": "hello"}])
    assert str(err.value) == expected
    # clex chat: the first message fails, and so would every other one: the command stops
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    assert refusal(capsys, ["chat", "--model", model, "--tokenizer", tok_dir, "--max-new-tokens", "2"]) == \
        f"clex chat: error: {expected}"
    # fine-tuning on chat data with it, and LongBench with --chat on
    data = tmp_path / "chat.jsonl"
    data.write_text(GOOD_CHAT + "\n")
    refusal(capsys, train_chat(model, data, tmp_path / "run", tok_dir), expected)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa"}) + "\n")
    refusal(capsys, longbench(model, records, tmp_path / "lb", "--chat", "on", tokenizer=tok_dir), expected)


def test_a_working_template_is_used_as_written(tmp_path):
    tok = D.load_tokenizer(str(save_tokenizer(tmp_path / "tok", GOOD_TEMPLATE)))
    assert C.prompt_ids(tok, [{"role": "user", "content": "hello"}]) == [2, 0]  # "user", then unknown "hello"


# --- 4. records whose fields have the wrong type -------------------------------------------------------------
RECORD = {"input": "Who?", "context": "Some context.", "answers": ["Ann"], "all_classes": None, "length": 3,
          "dataset": "hotpotqa"}
BAD_FIELDS = [
    ({"context": None}, "field 'context' must be a string, got null"),
    ({"input": 12345}, "field 'input' must be a string, got a number"),
    ({"input": ["Who?"]}, "field 'input' must be a string, got a list"),
    ({"answers": None}, "field 'answers' must be a string or a non-empty list of strings, got null"),
    ({"answers": []}, "field 'answers' must be a string or a non-empty list of strings, got an empty list"),
    ({"answers": ["Ann", 7]}, "field 'answers' must be a list of strings, got a list holding a number"),
    ({"all_classes": "abc"}, "field 'all_classes' must be null or a list of strings, got a string"),
    ({"all_classes": [1, 2]}, "field 'all_classes' must be null or a list of strings, got a list"),
    ({"dataset": 7}, "field 'dataset' must be a string (a LongBench dataset's name), got a number"),
    ({"dataset": ["hotpotqa"]}, "field 'dataset' must be a string (a LongBench dataset's name), got a list"),
    ({"length": "long"}, "field 'length' must be null or a number, got a string"),
    ({"dataset": "passage_retrieval_en", "answers": ["the second one"]},
     "field 'answers': a passage_retrieval_en answer must name its paragraph, like 'Paragraph 3', got 'the second"),
]


@pytest.mark.parametrize("change,message", BAD_FIELDS, ids=[f"{next(iter(c))}-{i}" for i, (c, _) in
                                                           enumerate(BAD_FIELDS)])
def test_longbench_fields_of_the_wrong_type_are_refused_before_use(model, tmp_path, capsys, change, message):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORD) + "\n\n" + json.dumps({**RECORD, **change}) + "\n")
    with pytest.raises(D.DataError) as err:
        LB.load_records(str(path))
    assert str(err.value).startswith(f"{path}:3: {message}")
    refusal(capsys, longbench(model, path, tmp_path / "out"), f"{path}:3: {message}")
    assert not (tmp_path / "out").exists()


def test_valid_longbench_records_still_load():
    records = LB.load_records(str(Path(__file__).parent / "data" / "longbench_tiny.jsonl"))
    assert records and all(isinstance(r["answers"], list) and isinstance(r["all_classes"], list) for r in records)
    one = LB._check({**RECORD, "answers": "Ann", "all_classes": ["x"]}, "r", None)
    assert one["answers"] == ["Ann"] and one["all_classes"] == ["x"]


@pytest.mark.parametrize(
    "line,message",
    [('{"text": "ok", "id": ["a"]}', "docs.jsonl:2: field 'id' must be a string or a number, got a list"),
     ('{"text": "ok", "id": null}', "docs.jsonl:2: field 'id' must be a string or a number, got null"),
     ('{"text": {"body": "x"}}', "docs.jsonl:2: field 'text' must be a string, got an object"),
     ('{"text": "ok", "meta": ' + DEEP + "}", "docs.jsonl:2: nests deeper than 64 levels"),
     ("[" * 70 + "]" * 70, "docs.jsonl:2: nests deeper than 64 levels")],
    ids=["id-list", "id-null", "text-object", "deep", "deep-within-the-limit-of-python"],
)
def test_text_records_of_the_wrong_shape_are_named(model, tmp_path, capsys, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "' + "word " * 20 + '"}\n' + line + "\n")
    with pytest.raises(D.DataError, match="^" + str(tmp_path / message).replace("(", r"\(").replace(")", r"\)")):
        D.load_documents(str(path))
    refusal(capsys, ppl(model, path, tmp_path / "out"), f"{tmp_path}/{message}")


# --- 5. JSON nested past any limit, in every JSON-lines reader ---------------------------------------------
@pytest.mark.parametrize("reader", ["text", "chat", "longbench"])
def test_deeply_nested_json_is_refused_not_a_recursion_error(model, tmp_path, capsys, reader):
    path = tmp_path / "deep.jsonl"
    path.write_text(DEEP + "\n")
    argv = {"text": ppl, "chat": train_chat, "longbench": longbench}[reader](model, path, tmp_path / "out")
    refusal(capsys, argv, f"{path}:1: nests deeper than 64 levels")


# --- 6. numbers that make no sense for chat and generate -----------------------------------------------------
@pytest.mark.parametrize(
    "command,flags,message",
    [("chat", ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
     ("chat", ["--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 1, got -3"),
     ("chat", ["--max-context", "0"], "--max-context must be an integer >= 2 (a prompt token and an answer token), "
                                      "got 0"),
     ("chat", ["--max-context", "-8"], "--max-context must be an integer >= 2"),
     ("chat", ["--max-context", "4", "--max-new-tokens", "4"], "--max-context (4) must exceed --max-new-tokens (4)"),
     ("generate", ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
     ("generate", ["--seed", "-1"], "--seed must be an integer in 0 … 2**64 - 1, got -1"),
     ("generate", ["--seed", str(2**64)], f"--seed must be an integer in 0 … 2**64 - 1, got {2**64}")],
)
def test_nonsense_token_counts_are_refused_in_the_words_of_their_flag(model, tmp_path, capsys, monkeypatch, command,
                                                                      flags, message):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello")
    argv = [command, "--model", model, "--tokenizer", "bytes", *flags]
    refusal(capsys, [*argv, "--prompt-file", prompt] if command == "generate" else argv, f": error: {message}")


def test_chat_session_refuses_the_same_counts(model):
    from clex import from_pretrained

    loaded = from_pretrained(model)
    with pytest.raises(D.DataError, match=r"^`max_new_tokens` must be an integer >= 1, got 0$"):
        S.ChatSession(loaded, D.ByteTokenizer(), max_new_tokens=0)
    with pytest.raises(D.DataError, match=r"^`max_context` must be an integer >= 2"):
        S.ChatSession(loaded, D.ByteTokenizer(), max_context=-1, max_new_tokens=4)


# --- 7. the cache directory without a home --------------------------------------------------------------------
def test_cache_root_follows_clex_cache_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEX_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and D.cache_dir() == tmp_path / "c" / "tokens"
    monkeypatch.setenv("CLEX_CACHE", "")  # empty is unset, never the working directory
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "clex"
    from clex.data import corpora

    assert corpora.code_wheel_path().parent == tmp_path / "home" / ".cache" / "clex" / "code"


def test_home_unset_uses_the_password_database_home(tmp_path, monkeypatch):
    import pwd

    entry = pwd.getpwuid(0)
    fake = type(entry)((*entry[:5], str(tmp_path / "pwhome"), *entry[6:]))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: fake)
    monkeypatch.delenv("CLEX_CACHE")
    monkeypatch.delenv("HOME", raising=False)
    assert cache_root() == tmp_path / "pwhome" / ".cache" / "clex"


@pytest.mark.parametrize("home", ["", "relative/home", None], ids=["empty", "relative", "unset-and-no-entry"])
def test_no_usable_home_is_one_line_and_writes_nothing_here(model, tmp_path, capsys, monkeypatch, home):
    import pwd

    monkeypatch.delenv("CLEX_CACHE")
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    else:
        monkeypatch.setenv("HOME", home)
    with pytest.raises(ValueError, match="set CLEX_CACHE to a folder for clex's cache, or HOME to your home"):
        cache_root()
    work = tmp_path / "work"
    work.mkdir()
    (work / "doc.txt").write_text("word " * 40)
    monkeypatch.chdir(work)
    refusal(capsys, ppl(model, work / "doc.txt", tmp_path / "out"), "HOME ", "set CLEX_CACHE")
    assert sorted(p.name for p in work.iterdir()) == ["doc.txt"]  # no ./tokens, no ./.cache
