"""The small CLI subcommands: methods, info, demo."""

from __future__ import annotations

import re

import torch

import clex
from clex.cli.main import main
from tiny import make_model, randomize_clex


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{name}\b", out, re.M) for name in clex.available_methods())


def test_info_shows_rope_and_learned_frequencies(tmp_path, capsys):
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model)
    model.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'rope_type': 'clex'" in out and "θ(4) / θ" in out
    ratios = [float(x) for x in out.split("per pair:")[1].split()]
    grid = clex.clex_modules(model)[0].trajectory()
    torch.testing.assert_close(torch.tensor(ratios), (grid[-1] / grid[0]), rtol=1e-2, atol=1e-3)


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nothing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
