"""A conversation with a model (``clex chat``): history, the chat template, streaming and stopping.

The history is re-rendered with the chat template each turn and its oldest exchanges are dropped when the
prompt and the answer budget outgrow the context. Generation goes through ``clex.generate``, so CLEX's t
follows the conversation's length.
"""

from __future__ import annotations

from collections.abc import Sequence

from clex import data as D
from clex.data.chat import DEFAULT_TEMPLATE, own_template, prompt_ids  # noqa: F401 (DEFAULT_TEMPLATE: also at clex.chat)
from clex.errors import NonFiniteLogits
from clex.generation import pad_id, refuse_nan

END_MARKER = "<|end|>"  # the default template's end of a turn


class TextSink:
    """The one streamer for ``generate``: writes the new text as it grows (any tokenizer, the byte-level one too),
    holding back an incomplete multi-byte character and a tail that may start one of ``stops``, and cutting the
    text at the first stop string."""

    def __init__(self, tokenizer, write, stops: Sequence[str] = ()):
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


def check_sampling(temperature: float, top_p: float | None = None) -> None:
    """Sampling settings ``clex chat`` / ``clex generate`` accept: temperature 0 (greedy) or a finite
    positive number, top-p in (0, 1]; anything else is refused, never silently greedy."""
    import math

    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise D.DataError(f"`temperature` must be 0 (greedy) or a finite positive number, got {temperature!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise D.DataError(f"`top_p` must be in (0, 1], got {top_p!r}")


def check_token_counts(max_new_tokens: int, max_context: int | None = None) -> None:
    """Token budgets ``clex chat`` / ``clex generate`` accept, each refused in the words of its own flag."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise D.DataError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 2):
        raise D.DataError(f"`max_context` must be an integer >= 2 (a prompt token and an answer token), got "
                          f"{max_context!r}")


class ChatSession:
    """A conversation with a model: the history is kept and re-rendered with the chat template at each turn;
    the oldest exchanges are dropped (``notice`` is called) when prompt + answer budget outgrow
    ``max_context``. Generation is greedy unless ``temperature`` > 0, through ``clex.generate`` (CLEX's t
    follows the conversation's length under ``cache_mode``; ``policy`` is its older name)."""

    def __init__(self, model, tokenizer, system: str | None = None, max_context: int | None = None,
                 max_new_tokens: int = 256, cache_mode: str = "rerotate", temperature: float = 0.0, notice=None,
                 *, policy: str | None = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        check_token_counts(max_new_tokens, max_context)
        self.max_context = max_context or model.config.get_text_config().max_position_embeddings
        if self.max_context <= max_new_tokens:
            raise D.DataError(f"`max_context` ({self.max_context}) must exceed `max_new_tokens` ({max_new_tokens})")
        check_sampling(temperature)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.cache_mode = policy if policy is not None else cache_mode
        self.notice = notice or (lambda text: None)
        self.history: list[dict] = []
        self.last_prompt: list[int] = []
        uses_default = isinstance(tokenizer, D.ByteTokenizer) or not own_template(tokenizer)
        self.stops = (END_MARKER,) if uses_default else ()

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str, write=None) -> str:
        """The model's answer to ``text`` (streamed through ``write`` as it is generated)."""
        import torch
        from transformers import StoppingCriteriaList

        from clex.generation import eos_ids, generate, until_eos

        self.history.append({"role": "user", "content": text})
        ids = prompt_ids(self.tokenizer, self._messages())
        while len(ids) + self.max_new_tokens > self.max_context and len(self.history) > 1:
            starts = [i for i, m in enumerate(self.history) if m["role"] == "user" and i > 0]
            self.history = self.history[starts[0] :]
            self.notice(f"history: dropped the oldest exchange to fit `max_context` {self.max_context}")
            ids = prompt_ids(self.tokenizer, self._messages())
        if len(ids) + self.max_new_tokens > self.max_context:
            self.history.pop()
            raise D.DataError(f"this message alone needs {len(ids)} tokens + {self.max_new_tokens} to answer, "
                              f"beyond `max_context` {self.max_context}")
        self.last_prompt = ids
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        sink = TextSink(self.tokenizer, write or (lambda s: None), self.stops)
        sampling = self.temperature > 0
        extra = {"do_sample": True, "temperature": self.temperature} if sampling else {"do_sample": False}
        eos = eos_ids(self.model, self.tokenizer)
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, len(ids), self.stops)] if self.stops else [])
        try:
            with torch.no_grad():
                out = generate(self.model, x, self.cache_mode, max_new_tokens=self.max_new_tokens, streamer=sink,
                               stopping_criteria=criteria, attention_mask=torch.ones_like(x),
                               pad_token_id=pad_id(self.tokenizer, self.model), logits_processor=[refuse_nan],
                               **extra)
        except NonFiniteLogits:
            self.history.pop()
            raise D.DataError("the model's logits are NaN (broken weights, or fp16 overflow); no answer") from None
        answer = D.decode(self.tokenizer, until_eos(out[0, len(ids) :].tolist(), eos))
        for s in self.stops:
            answer = answer.split(s, 1)[0]
        self.history.append({"role": "assistant", "content": answer})
        return answer
