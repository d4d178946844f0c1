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

from . import data as D

ROLES = ("system", "user", "assistant")
BAD_RECORD_ACTIONS = ("error", "skip")
IGNORE = -100  # label of tokens outside the loss
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatDataError(D.DataError):
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
        raise D.DataError(f"--on-bad-record must be one of {BAD_RECORD_ACTIONS}, got {on_bad_record!r}")
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


def _template(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


class ChatTemplateError(ValueError):
    """A chat template that does not parse or fails as it renders. Every conversation would fail the same way,
    so it ends the command (never a skipped record or a per-message notice); the message names its file."""


def template_source(tokenizer, template: str | None = None) -> tuple[str, bool]:
    """(where ``template`` — by default the tokenizer's — was read from, whether that is the template's own
    file, so that its line numbers are the file's)."""
    template = template or _template(tokenizer)
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
    out = apply_template(tokenizer, messages, chat_template=_template(tokenizer) or DEFAULT_TEMPLATE,
                         add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    return list(out)


def encode_conversation(tokenizer, messages: Sequence[dict], where: str = "conversation"):
    """(ids, labels) lists: labels equal ids on assistant tokens (the answer and the template's end marker
    after it) and IGNORE elsewhere."""
    template = None if isinstance(tokenizer, D.ByteTokenizer) else (_template(tokenizer) or DEFAULT_TEMPLATE)
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
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
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


# --- a chat session (``clex chat``) ---------------------------------------------------------------------
END_MARKER = "<|end|>"  # the default template's end of a turn


class _StopOnText:
    """Stops generation once the new text contains a stop string (for templates whose end of turn is text)."""

    def __init__(self, tokenizer, prompt_length: int, stops: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        # the marker may be a special token: keep special tokens in the text
        text = D.decode(self.tokenizer, input_ids[0, self.prompt_length :].tolist(), skip_special_tokens=False)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Sink:
    """A ``generate`` streamer that writes the answer as it grows, holding back what may be a stop string."""

    def __init__(self, tokenizer, write, stops: Sequence[str]):
        self.tokenizer, self.write, self.stops = tokenizer, write, stops
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def _visible(self, final: bool) -> str:
        text = D.decode(self.tokenizer, self.ids)
        if not final:  # an incomplete multi-byte character waits too
            text = text.rstrip("\ufffd")
        for s in self.stops:
            text = text.split(s, 1)[0]
        if not final:  # a tail that could start a stop string waits for the next token
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        return text

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self._visible(final=False)
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = self._visible(final=True)
        if len(text) > self.shown:
            self.write(text[self.shown :])
        self.shown = len(text)


class _NaNLogits(RuntimeError):
    pass


def _refuse_nan(input_ids, scores):
    """A logits processor: NaN logits stop generation (their argmax or sample would be garbage)."""
    import torch

    if torch.isnan(scores).any():
        raise _NaNLogits
    return scores


def check_sampling(temperature: float, top_p: float | None = None) -> None:
    """Sampling settings ``clex chat`` / ``clex generate`` accept: temperature 0 (greedy) or a finite
    positive number, top-p in (0, 1]; anything else is refused, never silently greedy."""
    import math

    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise D.DataError(f"--temperature must be 0 (greedy) or a finite positive number, got {temperature!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise D.DataError(f"--top-p must be in (0, 1], got {top_p!r}")


def check_token_counts(max_new_tokens: int, max_context: int | None = None) -> None:
    """Token budgets ``clex chat`` / ``clex generate`` accept, each refused in the words of its own flag."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise D.DataError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 2):
        raise D.DataError(f"--max-context must be an integer >= 2 (a prompt token and an answer token), got "
                          f"{max_context!r}")


class ChatSession:
    """A conversation with a model: the history is kept and re-rendered with the chat template at each turn;
    the oldest exchanges are dropped (``notice`` is called) when prompt + answer budget outgrow
    ``max_context``. Generation is greedy unless ``temperature`` > 0, through ``clex.generate`` (CLEX's t
    follows the conversation's length under the cache ``policy``)."""

    def __init__(self, model, tokenizer, system: str | None = None, max_context: int | None = None,
                 max_new_tokens: int = 256, policy: str = "rerotate", temperature: float = 0.0, notice=None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        check_token_counts(max_new_tokens, max_context)
        self.max_context = max_context or model.config.get_text_config().max_position_embeddings
        if self.max_context <= max_new_tokens:
            raise D.DataError(f"--max-context ({self.max_context}) must exceed --max-new-tokens ({max_new_tokens})")
        check_sampling(temperature)
        self.max_new_tokens, self.policy, self.temperature = max_new_tokens, policy, temperature
        self.notice = notice or (lambda text: None)
        self.history: list[dict] = []
        self.last_prompt: list[int] = []
        uses_default = isinstance(tokenizer, D.ByteTokenizer) or not _template(tokenizer)
        self.stops = (END_MARKER,) if uses_default else ()

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str, write=None) -> str:
        """The model's answer to ``text`` (streamed through ``write`` as it is generated)."""
        import torch
        from transformers import StoppingCriteriaList

        from .cache import eos_ids, generate, until_eos

        self.history.append({"role": "user", "content": text})
        ids = prompt_ids(self.tokenizer, self._messages())
        while len(ids) + self.max_new_tokens > self.max_context and len(self.history) > 1:
            starts = [i for i, m in enumerate(self.history) if m["role"] == "user" and i > 0]
            self.history = self.history[starts[0] :]
            self.notice(f"history: dropped the oldest exchange to fit --max-context {self.max_context}")
            ids = prompt_ids(self.tokenizer, self._messages())
        if len(ids) + self.max_new_tokens > self.max_context:
            self.history.pop()
            raise D.DataError(f"this message alone needs {len(ids)} tokens + {self.max_new_tokens} to answer, "
                              f"beyond --max-context {self.max_context}")
        self.last_prompt = ids
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        sink = _Sink(self.tokenizer, write or (lambda s: None), self.stops)
        sampling = self.temperature > 0
        extra = {"do_sample": True, "temperature": self.temperature} if sampling else {"do_sample": False}
        eos = eos_ids(self.model, self.tokenizer)
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, len(ids), self.stops)] if self.stops else [])
        try:
            with torch.no_grad():
                out = generate(self.model, x, policy=self.policy, max_new_tokens=self.max_new_tokens, streamer=sink,
                               stopping_criteria=criteria, attention_mask=torch.ones_like(x),
                               pad_token_id=eos[0] if eos else 0, logits_processor=[_refuse_nan],
                               **extra)
        except _NaNLogits:
            self.history.pop()
            raise D.DataError("the model's logits are NaN (broken weights, or fp16 overflow); no answer") from None
        answer = D.decode(self.tokenizer, until_eos(out[0, len(ids) :].tolist(), eos))
        for s in self.stops:
            answer = answer.split(s, 1)[0]
        self.history.append({"role": "assistant", "content": answer})
        return answer
