"""Chat data for instruction tuning (``clex train --format chat``) and the rendering ``clex chat`` uses.

A record is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, …]}`` (JSONL,
parquet, or a hub dataset, read through ``clex.data``). A conversation is rendered with the
tokenizer's chat template — or, when it has none, :data:`DEFAULT_TEMPLATE` (byte-level models get the
same text rendered in Python) — and only assistant tokens are labelled: from transformers' assistant
mask when the template marks its ``{% generation %}`` blocks, otherwise by rendering the conversation
up to each assistant turn (with the generation prompt) and through it, and labelling the difference.

Conversations longer than the train length lose their oldest exchanges (a leading system message is
kept; the last answer never is cut) or, when even the last exchange does not fit, are dropped. Short
ones are padded to the train length (default) or packed several to a row, each with its own positions
and an attention mask that keeps it to itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clex import data as D
from clex.errors import BadInput
from clex.generation import pad_id

ROLES = ("system", "user", "assistant")
BAD_RECORD_ACTIONS = ("error", "skip")
IGNORE = -100  # label of tokens outside the loss
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatDataError(BadInput):
    """A conversation record that cannot be used; the message names the record."""


@dataclass
class ChatStats:
    conversations: int = 0
    truncated: int = 0  # lost their oldest exchanges to fit
    dropped: int = 0  # did not fit even with only the last exchange
    skipped: int = 0  # bad records skipped (--on-bad-record skip)

    def summary(self) -> str:
        return (f"{self.conversations} conversations: {self.truncated} truncated from the left, {self.dropped} "
                f"dropped as too long, {self.skipped} bad records skipped")


# --- records -------------------------------------------------------------------------------------------
def check_messages(messages, where: str) -> list[dict]:
    """The messages of one record, or a ChatDataError naming it (and the message and field at fault)."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else D.json_kind(messages)
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {got}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatDataError(f"{where}: message {i} must have 'role' and 'content'"
                                + ("" if isinstance(m, dict) else f", got {D.json_kind(m)}"))
        if not isinstance(m["role"], str):
            raise ChatDataError(f"{where}: message {i} field 'role' must be a string ({', '.join(ROLES)}), got "
                                f"{D.json_kind(m['role'])}")
        if m["role"] not in ROLES:
            raise ChatDataError(f"{where}: message {i} has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ChatDataError(f"{where}: message {i} field 'content' must be a string, got "
                                f"{D.json_kind(m['content'])}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatDataError(f"{where}: the conversation has no assistant message to learn from")
    return out


def load_conversations(source: str, on_bad_record: str = "error", stats: ChatStats | None = None) -> list[list[dict]]:
    """Conversations of a JSONL/parquet file or hub dataset with a ``messages`` field."""
    if on_bad_record not in BAD_RECORD_ACTIONS:
        raise D.DataError(f"`on_bad_record` must be one of {BAD_RECORD_ACTIONS}, got {on_bad_record!r}")
    stats = stats if stats is not None else ChatStats()
    out = []
    for where, record in _records(source):
        try:
            if isinstance(record, ChatDataError):
                raise record
            if not isinstance(record, dict):
                raise ChatDataError(f"{where}: a record must be a JSON object with a 'messages' field, got "
                                    f"{D.json_kind(record)}")
            if "messages" not in record:
                raise ChatDataError(f"{where}: record has no 'messages'")
            out.append(check_messages(record["messages"], where))
        except ChatDataError as err:
            if on_bad_record == "error":
                raise
            stats.skipped += 1
            warnings.warn(f"skipped: {err}", stacklevel=2)
    if not out:
        raise D.DataError(f"{source}: no usable conversations")
    return out


def _records(source: str):
    name, split = D.parse_source(source)
    if name.endswith(".jsonl"):
        if not os.path.exists(name):
            raise D.DataError(f"chat data {name!r} not found")
        for no, line in D.jsonl_lines(Path(name)):
            try:
                yield f"{name}:{no}", D.json_line(line, name, no)
            except D.DataError as err:  # not UTF-8, not JSON, nested too deep: a bad record like any other
                yield f"{name}:{no}", ChatDataError(str(err))
        return
    if name.endswith(".parquet"):
        import pandas as pd

        rows = pd.read_parquet(name).to_dict("records")
    elif os.path.exists(name):
        raise D.DataError(f"chat data must be .jsonl, .parquet or a hub dataset, got {name!r}")
    else:
        if not D.hub_reachable():
            raise D.DataError(f"{source}: not a local file and the hub is not reachable")
        from datasets import load_dataset

        rows = load_dataset(name, split=split or "train")
    for i, row in enumerate(rows):
        row = dict(row)
        if hasattr(row.get("messages"), "tolist"):  # parquet gives an array of messages, not a list
            row["messages"] = list(row["messages"])
        yield f"{name}[{i}]", row


# --- rendering -----------------------------------------------------------------------------------------
def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """:data:`DEFAULT_TEMPLATE` in Python (for byte-level tokenizers, which have no template engine)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids that ask the model for the next assistant message (what ``clex chat`` feeds)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def own_template(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


class ChatTemplateError(BadInput):
    """A chat template that does not parse or fails as it renders. Every conversation would fail the same way,
    so it ends the command (never a skipped record or a per-message notice); the message names its file."""


def template_source(tokenizer, template: str | None = None) -> tuple[str, bool]:
    """(where ``template`` — by default the tokenizer's — was read from, whether that is the template's own
    file, so that its line numbers are the file's)."""
    template = template or own_template(tokenizer)
    if template is None or template == DEFAULT_TEMPLATE:
        return "clex's default chat template", True
    name = getattr(tokenizer, "name_or_path", "") or ""
    if name and os.path.isdir(name):
        for file in ("chat_template.jinja", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(name, file)):
                return os.path.join(name, file), file.endswith(".jinja")
    return f"the chat template of tokenizer {name!r}" if name else "the tokenizer's chat template", True


def _template_line(err: BaseException) -> int | None:
    """The template line an error was raised at: a syntax error's own, else the last ``<template>`` frame
    of the traceback (jinja2 rewrites its frames to the template's lines)."""
    line = getattr(err, "lineno", None)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def apply_template(tokenizer, messages: Sequence[dict], **kwargs):
    """``tokenizer.apply_chat_template`` with the template's failures (a syntax error, ``raise_exception``, an
    undefined name, any error raised inside it) as one :class:`ChatTemplateError` naming the template's file
    and line."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(list(messages), **kwargs)
    except Exception as err:  # noqa: BLE001 - only errors raised by or inside the template are reworded
        line = _template_line(err)
        if not isinstance(err, jinja2.TemplateError) and line is None:
            raise
        source, own_file = template_source(tokenizer, kwargs.get("chat_template"))
        where = source if line is None else f"{source}:{line}" if own_file else f"{source} (chat_template line {line})"
        what = {jinja2.TemplateSyntaxError: "does not parse", jinja2.UndefinedError: "uses an undefined name or field",
                jinja2.TemplateError: "raised an error"}.get(type(err), f"failed ({type(err).__name__})")
        message = " ".join(str(err).split()) or type(err).__name__
        raise ChatTemplateError(f"{where}: the chat template {what}: {message}") from None


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    if isinstance(tokenizer, D.ByteTokenizer):
        return tokenizer.encode(render_text(messages, add_generation_prompt))
    out = apply_template(tokenizer, messages, chat_template=own_template(tokenizer) or DEFAULT_TEMPLATE,
                         add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    return list(out)


def encode_conversation(tokenizer, messages: Sequence[dict], where: str = "conversation"):
    """(ids, labels) lists: labels equal ids on assistant tokens (the answer and the template's end marker
    after it) and IGNORE elsewhere."""
    template = None if isinstance(tokenizer, D.ByteTokenizer) else (own_template(tokenizer) or DEFAULT_TEMPLATE)
    if template is not None and "{% generation %}" in template.replace("{%- generation %}", "{% generation %}"):
        out = apply_template(tokenizer, messages, chat_template=template, tokenize=True, return_dict=True,
                             return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [i if m else IGNORE for i, m in zip(ids, out["assistant_masks"], strict=True)]
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else []
        through = _render(tokenizer, messages[: i + 1], False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ChatDataError(f"{where}: the chat template does not render message {i} as a continuation of "
                                "the ones before it; assistant tokens cannot be found")
        labels[len(before) : len(through)] = ids[len(before) : len(through)]
    return ids, labels


def fit_conversation(tokenizer, messages: list[dict], length: int, where: str = "conversation"):
    """(ids, labels, truncated) within ``length`` tokens, dropping the oldest exchanges (a leading system
    message stays), or None when even the last exchange does not fit. The conversation is first cut
    after its last assistant message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head) :]
    truncated = False
    while True:
        ids, labels = encode_conversation(tokenizer, head + rest, where)
        if len(ids) <= length:
            return ids, labels, truncated
        starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not starts:
            return None
        rest, truncated = rest[starts[0] :], True


# --- rows ----------------------------------------------------------------------------------------------
@dataclass
class ChatRows:
    """Training rows: ids, labels and segment ids (−1 on padding), all ``[rows, length]``."""

    ids: np.ndarray
    labels: np.ndarray
    segments: np.ndarray
    stats: ChatStats


def build_rows(tokenizer, conversations: list[list[dict]], length: int, pack: bool = False,
               stats: ChatStats | None = None) -> ChatRows:
    """Each conversation fitted to ``length``, then one per row (padded) or packed first-fit in order."""
    stats = stats if stats is not None else ChatStats()
    pad = pad_id(tokenizer)
    encoded = []
    for i, conv in enumerate(conversations):
        fitted = fit_conversation(tokenizer, conv, length, f"conversation {i}")
        stats.conversations += 1
        if fitted is None:
            stats.dropped += 1
            continue
        stats.truncated += fitted[2]
        encoded.append(fitted[:2])
    if not encoded:
        raise D.DataError(f"no conversation fits in {length} tokens ({stats.summary()})")
    rows: list[list[tuple[list[int], list[int]]]] = []
    for pair in encoded:
        if pack and rows and sum(len(p[0]) for p in rows[-1]) + len(pair[0]) <= length:
            rows[-1].append(pair)
        else:
            rows.append([pair])
    ids = np.full((len(rows), length), pad, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), length), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for s, (x, y) in enumerate(row):
            ids[r, at : at + len(x)], labels[r, at : at + len(y)], segments[r, at : at + len(x)] = x, y, s
            labels[r, at] = IGNORE  # a segment's first token is never predicted from the one before it
            at += len(x)
    return ChatRows(ids, labels, segments, stats)


def packed_inputs(segments, dtype=None):
    """(4-D attention mask [B, 1, n, n], position ids [B, n]) for rows of packed segments: causal within a
    segment, nothing across segments; positions restart at 0 in each segment (and padding). The mask is
    additive in ``dtype`` (default fp32), or boolean (True: attend) when ``dtype`` is ``torch.bool``."""
    import torch

    seg = torch.as_tensor(segments)
    b, n = seg.shape
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = same & causal & (seg[:, :, None] >= 0) | torch.eye(n, dtype=torch.bool)  # pads see themselves
    dtype = dtype or torch.float32
    if dtype == torch.bool:  # sdpa takes a boolean mask whatever the dtype autocast computes in
        mask = allowed[:, None]
    else:
        mask = torch.zeros(b, 1, n, n, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    index = torch.arange(n).expand(b, n)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return mask, index - last_start
