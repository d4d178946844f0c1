"""CLEX profiles for a serving engine: the rotary table of every integer t side by side, and the admission rule.

A CLEX export carries, beside its stock ``longrope`` fields, a ``clex_profiles`` entry in ``config.json``: the
training length L, the largest t it serves (T), CLEX's inverse frequencies θ(1) … θ(T) and the cos/sin scale.
An engine then serves each request at its own t, fixed for the request's life (clex's ``frozen`` policy):

* admission: t = ⌈(prompt tokens + max_tokens) / L⌉, at least 1; a client may ask for more, never less; a request
  that needs more than T·L tokens is refused;
* the table: the rows of profile t are cos/sin of positions 0 … t·L − 1 at θ(t), starting at row L·t(t−1)/2, so a
  token at position p of a request at t reads row ``offset(t) + p``;
* the prefix cache: the profile is part of the cache salt, so keys computed at one t are never reused at another.

Pure torch and the standard library: the vLLM plugin uses it, and clex's tests check it without vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

CONFIG_KEY = "clex_profiles"
FORMAT = 1
REQUEST_KEY = "clex_t"  # SamplingParams.extra_args[REQUEST_KEY] (``vllm_xargs`` on the OpenAI server): raise t


class ProfileError(ValueError):
    """A request or a config the profiles cannot serve; the message says what to change."""


@dataclass(frozen=True)
class Profiles:
    """The ``clex_profiles`` entry of an exported config."""

    L: int
    T: int
    inv_freq: tuple[tuple[float, ...], ...]  # θ(1) … θ(T), fp32 values
    attention_scaling: float = 1.0

    @classmethod
    def from_config(cls, entry: dict) -> Profiles:
        """Read and check the entry; one line naming the field on anything malformed."""
        if not isinstance(entry, dict):
            raise ProfileError(f"{CONFIG_KEY} must be an object, got {type(entry).__name__}")
        if entry.get("format") != FORMAT:
            raise ProfileError(f"{CONFIG_KEY}.format is {entry.get('format')!r}; this plugin reads format {FORMAT}")
        L, T, inv = entry.get("L"), entry.get("T"), entry.get("inv_freq")
        for name, v in (("L", L), ("T", T)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProfileError(f"{CONFIG_KEY}.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(inv, list) or len(inv) != T:
            raise ProfileError(f"{CONFIG_KEY}.inv_freq must be a list of T = {T} lists (θ(1) … θ(T))")
        width = {len(row) if isinstance(row, list) else -1 for row in inv}
        if len(width) != 1 or min(width) < 1:
            raise ProfileError(f"{CONFIG_KEY}.inv_freq rows must be lists of one length (half the rotary width)")
        rows = []
        for row in inv:
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                       for x in row):
                raise ProfileError(f"{CONFIG_KEY}.inv_freq holds a value that is not a finite positive number")
            rows.append(tuple(float(x) for x in row))
        scale = entry.get("attention_scaling", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ProfileError(f"{CONFIG_KEY}.attention_scaling must be a finite positive number, got {scale!r}")
        return cls(L=L, T=T, inv_freq=tuple(rows), attention_scaling=float(scale))

    def to_config(self) -> dict:
        return {"format": FORMAT, "L": self.L, "T": self.T, "inv_freq": [list(r) for r in self.inv_freq],
                "attention_scaling": self.attention_scaling}

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq[0])

    @property
    def rows(self) -> int:
        """Rows of the side-by-side table: L·(1 + 2 + … + T)."""
        return offset(self.T + 1, self.L)

    def profile_for(self, prompt_tokens: int, max_tokens: int, requested: object = None) -> int:
        """The request's t: the smallest with t·L ≥ prompt + max_tokens, raised to ``requested`` if given."""
        need = prompt_tokens + max_tokens
        if need > self.T * self.L:
            raise ProfileError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {need} exceeds the {self.T}·{self.L} "
                f"= {self.T * self.L} tokens this CLEX export serves; send a shorter prompt or a smaller max_tokens, "
                "or export at a larger --factor"
            )
        t = max(1, math.ceil(need / self.L))
        if requested is not None:
            if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= self.T:
                raise ProfileError(f"{REQUEST_KEY} must be an integer in 1 … {self.T}, got {requested!r}")
            t = max(t, requested)
        return t

    def tag(self, t: int) -> str:
        """The profile's name in the prefix-cache salt: t and a digest of its frequencies and scale."""
        body = json.dumps([self.L, t, self.inv_freq[t - 1], self.attention_scaling]).encode()
        return f"clex:t{t}:{hashlib.sha256(body).hexdigest()[:16]}"

    def salt(self, t: int, user_salt: str | None) -> str:
        """The request's cache salt: the client's own (kept, so its isolation holds) and the profile's tag."""
        return f"{user_salt}|{self.tag(t)}" if user_salt else self.tag(t)

    def cos_sin_table(self) -> torch.Tensor:
        """``[rows, rotary_dim]`` fp32: for each t, cos | sin of positions 0 … t·L − 1 at θ(t), times the scale —
        computed as clex's rotary computes them (fp32 position × fp32 θ), so each slice equals clex at t."""
        parts = []
        for t, theta in enumerate(self.inv_freq, start=1):
            freqs = torch.arange(t * self.L, dtype=torch.float32)[:, None] * torch.tensor(theta, dtype=torch.float32)
            cos, sin = freqs.cos(), freqs.sin()
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
            parts.append(torch.cat((cos, sin), dim=-1))
        return torch.cat(parts)

    def offsets(self) -> list[int]:
        """Row where each profile's table starts, indexed by t (index 0 unused)."""
        return [0] + [offset(t, self.L) for t in range(1, self.T + 1)]


def offset(t: int, L: int) -> int:
    """First row of profile t: the tables of 1 … t − 1 come before it, L·(1 + … + (t − 1)) rows."""
    return L * t * (t - 1) // 2
