"""Every sequence at its own t: in a batch each row (or each sequence packed into a row) gets CLEX's frequencies
for its own length, so it computes what the same prompt computes alone, under every cache policy and cache."""

from __future__ import annotations

import pytest
import torch

import clex
from clex.positions import token_lengths
from tiny import L, make_model, randomize_clex, tokens

LENGTHS = (5, 20, 40)  # t = 1, 2, 3 over L = 16 at the prompt, each crossing into the next t while generating
NEW = 30


@pytest.fixture(scope="module")
def model():
    m = make_model("llama")
    clex.apply(m, "clex:max_factor=8")
    randomize_clex(m, scale=0.3)
    return m


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def _generate(model, ids, mask, cache_mode, cache):
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    return clex.generate(model, ids, cache_mode=cache_mode, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("cache_mode", ["rerotate", "recompute", "frozen", "off"])
def test_each_row_of_a_left_padded_batch_generates_as_it_does_alone(model, cache_mode, cache):
    rows = [tokens(n, seed=n)[0] for n in LENGTHS]
    ids, mask = _left_padded(rows)
    batch = _generate(model, ids, mask, cache_mode, cache)
    for i, row in enumerate(rows):
        alone = _generate(model, row[None], torch.ones_like(row[None]), cache_mode, cache)
        steps = len(alone.logits)  # alone stops at its end-of-sequence token; the batch goes on for the others
        for step in range(steps):
            torch.testing.assert_close(batch.logits[step][i], alone.logits[step][0], rtol=0, atol=1e-5)
        assert torch.equal(batch.sequences[i, ids.shape[1] : ids.shape[1] + steps], alone.sequences[0, len(row) :])


def test_a_right_padded_forward_gives_each_row_its_own_length(model):
    rows = [tokens(n, seed=n)[0] for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.full((len(rows), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None], attention_mask=torch.ones_like(r[None])).logits[0]
            torch.testing.assert_close(batch[i, : len(r)], alone, rtol=0, atol=1e-5)


def test_packed_sequences_each_get_their_own_t(model):
    """Two sequences in one row (positions restart): the rotary module's cos/sin for each equal its own."""
    rot = clex.clex_modules(model)[0]
    x = torch.zeros(1)
    first, second = torch.arange(40), torch.arange(10)  # t = 3 and t = 1 over L = 16
    cos, sin = rot(x, torch.cat([first, second])[None])
    for part, positions in ((slice(0, 40), first), (slice(40, 50), second)):
        alone_cos, alone_sin = rot(x, positions[None])
        torch.testing.assert_close(cos[:, part], alone_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin[:, part], alone_sin, rtol=0, atol=0)
    assert not torch.equal(cos[:, 40:], rot(x, torch.arange(50)[None])[0][:, 40:])  # not the row's longest t


def test_token_lengths_follow_positions_and_the_mask():
    pos = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert token_lengths(pos, mask).tolist() == [[1, 1, 4, 4, 4, 4], [3, 3, 3, 3, 3, 3], [3, 3, 3, 6, 6, 6]]
    assert token_lengths(pos[1:2]).tolist() == [[6] * 6]  # without a mask every token counts


def test_training_keeps_one_t_per_step_from_the_longest_row(model):
    rot = clex.clex_modules(model)[0]
    positions = torch.stack([torch.arange(2 * L), torch.arange(2 * L)])
    rot._attend = torch.tensor([[1] * 2 * L, [1] * 4 + [0] * (2 * L - 4)])
    try:
        rot.train()
        t, _ = rot.token_factors(positions)
        assert t == 2.0  # one t′ for the step, whatever the padding
        rot.eval()
        t, _ = rot.token_factors(positions)
        assert t[0].unique().tolist() == [2.0] and t[1].unique().tolist() == [1.0]
    finally:
        rot._attend = None
        rot.eval()
