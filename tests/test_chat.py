"""Chat data (assistant masks, truncation, packing), chat fine-tuning through the one loop, and `clex chat`."""

from __future__ import annotations

import io
import json

import pytest
import torch
import transformers as tf

from clex.cli.main import main
from clex.data import chat as C
from clex.data.tokens import ByteTokenizer
from clex.data.types import DataError
from clex.serve import chat as S
from clex.training.loop import train
from clex.training.options import TrainConfig
from tiny import save_llama, tiny_llama

BYTES = ByteTokenizer()
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Colour of grass?"},
    {"role": "assistant", "content": "Green."},
]
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|im_start|>", "<|im_end|>", "</s>"]
    tk.train_from_iterator([C.render_text(CONV)] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")


def labelled_text(tok, ids, labels) -> list[str]:
    """The labelled spans, decoded."""
    spans, current = [], []
    for i, y in zip(ids, labels, strict=True):
        if y != C.IGNORE:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    decode = tok.decode if isinstance(tok, ByteTokenizer) else (lambda x: tok.decode(x, skip_special_tokens=False))
    return [decode(s) for s in spans]


# --- assistant masks ----------------------------------------------------------------------------------------
def test_byte_rendering_labels_exactly_the_assistant_turns():
    ids, labels = C.encode_conversation(BYTES, CONV)
    assert BYTES.decode(ids) == C.render_text(CONV)
    assert labelled_text(BYTES, ids, labels) == ["Hello!<|end|>\n", "Green.<|end|>\n"]
    assert all(y in (C.IGNORE, i) for i, y in zip(ids, labels, strict=True))


def test_transformers_assistant_mask_and_the_fallback_agree(bpe):
    bpe.chat_template = None  # no template: the default one, whose {% generation %} blocks transformers reads
    ids, labels = C.encode_conversation(bpe, CONV)
    assert labelled_text(bpe, ids, labels) == ["Hello!<|end|>\n", "Green.<|end|>\n"]
    bpe.chat_template = C.DEFAULT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert C.encode_conversation(bpe, CONV) == (ids, labels)  # the prefix-rendering fallback, same labels
    bpe.chat_template = CHATML  # a real template without generation blocks (SmolLM2's shape)
    ids, labels = C.encode_conversation(bpe, CONV)
    assert labelled_text(bpe, ids, labels) == ["Hello!<|im_end|>\n", "Green.<|im_end|>\n"]
    bpe.chat_template = None


def test_truncation_drops_the_oldest_exchange_and_keeps_the_last_answer():
    full = len(C.encode_conversation(BYTES, CONV)[0])
    ids, labels, truncated = C.fit_conversation(BYTES, CONV, full - 1)
    text = BYTES.decode(ids)
    assert truncated and "Hi there" not in text and text.startswith("<|system|>\nBe brief.")
    assert labelled_text(BYTES, ids, labels) == ["Green.<|end|>\n"]
    assert C.fit_conversation(BYTES, CONV, full)[2] is False
    assert C.fit_conversation(BYTES, CONV, 20) is None  # even the last exchange does not fit: dropped
    short = len(C.encode_conversation(BYTES, CONV[:3])[0])  # shorter than CONV's system + last exchange
    rows = C.build_rows(BYTES, [CONV, CONV[:3]], short)
    assert rows.stats.dropped == 1 and rows.ids.shape == (1, short)


def test_packed_conversations_do_not_attend_across_each_other():
    model = tiny_llama(max_position_embeddings=256)
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    rows = C.build_rows(BYTES, convs, 256, pack=True)
    assert rows.ids.shape[0] == 1 and set(rows.segments[0]) == {-1, 0, 1, 2}
    for dtype in (torch.float32, torch.bool):  # additive (eager) and boolean (sdpa, what training uses)
        mask, positions = C.packed_inputs(rows.segments, dtype)
        with torch.no_grad():
            packed = model(input_ids=torch.as_tensor(rows.ids), attention_mask=mask, position_ids=positions).logits[0]
            at = 0
            for conv in convs:
                ids = torch.tensor([C.encode_conversation(BYTES, conv)[0]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed[at : at + ids.shape[1]], alone, atol=1e-5, rtol=0)
                at += ids.shape[1]


# --- records ------------------------------------------------------------------------------------------------
def test_bad_records_name_the_record_and_skip_on_request(tmp_path):
    good = {"messages": CONV}
    cases = [({"text": "no messages"}, "has no 'messages'"),
             ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
             ({"messages": []}, "non-empty list")]
    for bad, message in cases:
        path = tmp_path / "data.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"data.jsonl:2: .*{message}"):
            C.load_conversations(str(path))
        stats = C.ChatStats()
        with pytest.warns(UserWarning, match="skipped"):
            assert len(C.load_conversations(str(path), "skip", stats)) == 1
        assert stats.skipped == 1
    with pytest.raises(DataError, match="`on_bad_record` must be one of"):
        C.load_conversations(str(path), "ignore")
    with pytest.raises(DataError, match="not found"):
        C.load_conversations(str(tmp_path / "missing.jsonl"))


# --- fine-tuning --------------------------------------------------------------------------------------------
def _conversations(n: int, offset: int = 0) -> list[dict]:
    words = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
    return [{"messages": [{"role": "user", "content": f"Say {words[(i + offset) % 8]}."},
                          {"role": "assistant", "content": f"{words[(i + offset) % 8].upper()}!"}]}
            for i in range(n)]


def _assistant_loss(model, convs) -> float:
    rows = C.build_rows(BYTES, [c["messages"] for c in convs], 64)
    with torch.no_grad():
        return float(model(input_ids=torch.as_tensor(rows.ids), attention_mask=torch.as_tensor(rows.segments >= 0),
                           labels=torch.as_tensor(rows.labels)).loss)


@pytest.mark.parametrize(("method", "pack"), [("clex:max_factor=4", False), ("clex:max_factor=4", True),
                                             ("vanilla", True)])
def test_chat_fine_tuning_lowers_the_assistant_loss(tmp_path, method, pack):
    save_llama(tmp_path / "init", hidden_size=48, intermediate_size=96, max_position_embeddings=64)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _conversations(64)))
    held_out = _conversations(8, offset=3)
    before = _assistant_loss(clex_load(tmp_path / "init"), held_out)
    out = train(TrainConfig(model=str(tmp_path / "init"), out=str(tmp_path / "run"), method=method, data=str(data),
                            tokenizer="bytes", format="chat", pack=pack, steps=40, batch_size=8, lr=3e-3, warmup=0.0,
                            show_progress=False))
    after = _assistant_loss(clex_load(out), held_out)
    print(f"assistant loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
    stats = json.loads((out / "chat_data.json").read_text())
    assert stats["conversations"] == 64 and stats["dropped"] == 0


def clex_load(path):
    from clex import from_pretrained

    return from_pretrained(path).eval()


def test_pack_needs_chat_format(tmp_path):
    with pytest.raises(ValueError, match="`pack` applies to `format` chat"):
        train(TrainConfig(model="x", out=str(tmp_path), pack=True))


# --- clex chat ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("chat") / "model", max_position_embeddings=512, eos_token_id=None,
                      bos_token_id=None)


def test_session_keeps_history_and_reset_clears_it(chat_model):
    session = S.ChatSession(clex_load(chat_model), BYTES, system="Be brief.", max_new_tokens=6)
    pieces = []
    first = session.reply("What is up?", write=pieces.append)
    assert "".join(pieces) == first and len(pieces) > 1  # streamed, and the stream adds up to the answer
    session.reply("And then?")
    prompt = BYTES.decode(session.last_prompt)
    expected = C.render_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is up?"},
                              {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}], True)
    assert prompt == expected  # the second prompt holds the first exchange
    session.reset()
    session.reply("Fresh start")
    assert "What is up?" not in BYTES.decode(session.last_prompt)


def test_session_drops_the_oldest_exchange_beyond_max_context(chat_model):
    notices = []
    session = S.ChatSession(clex_load(chat_model), BYTES, max_context=90, max_new_tokens=8, notice=notices.append)
    session.reply("first message here")
    session.reply("second message here")
    assert notices and "dropped the oldest exchange" in notices[0]
    assert "first message" not in BYTES.decode(session.last_prompt)
    with pytest.raises(DataError, match="beyond `max_context`"):
        session.reply("x" * 200)


def test_cli_chat_through_a_pipe(chat_model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHow are you?\n/reset\nAgain\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(chat_model), "--tokenizer", "bytes", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3  # one answer per message, commands answered on stderr
    assert "history cleared" in err


def test_stop_on_the_end_marker_even_when_it_is_a_special_token(bpe):
    end = bpe.convert_tokens_to_ids("<|end|>")
    prompt = bpe("Hi", add_special_tokens=False)["input_ids"]
    stop = S._StopOnText(bpe, len(prompt), (S.END_MARKER,))
    answer = bpe("Green.", add_special_tokens=False)["input_ids"]
    assert not bool(stop(torch.tensor([prompt + answer]), None)[0])
    assert bool(stop(torch.tensor([prompt + answer + [end]]), None)[0])
    assert bool(S._StopOnText(BYTES, 2, (S.END_MARKER,))(torch.tensor([BYTES.encode("Hi ok<|end|>")]), None)[0])
