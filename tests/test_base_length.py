"""The training length L as a declared setting: ``--base-length`` on every command that applies a method, the
spec parameter ``original_max_position_embeddings`` in Python; reports count lengths in the declared L."""

from __future__ import annotations

import json

import pytest

from clex.cli.main import main
from clex.methods import declare_length
from test_eval_ppl import L, corpus, model_dir, run  # noqa: F401  (fixtures)


def test_declare_length_adds_the_spec_parameter_once():
    assert declare_length("clex", 16) == "clex:original_max_position_embeddings=16"
    assert declare_length("yarn:factor=4", 16) == "yarn:factor=4,original_max_position_embeddings=16"
    assert declare_length("clex:original_max_position_embeddings=16", 16) == "clex:original_max_position_embeddings=16"
    assert declare_length("clex", None) == "clex"
    with pytest.raises(ValueError, match="L given twice"):
        declare_length("clex:original_max_position_embeddings=8", 16)
    for bad in (0, -3, 2.5, True, "16"):
        with pytest.raises(ValueError, match="base_length"):
            declare_length("clex", bad)


def test_a_declared_length_is_the_L_of_every_method_and_of_the_report(model_dir, corpus):  # noqa: F811
    declared = run(model_dir, corpus, methods=["vanilla", "clex", "yarn:factor=2"], lengths=[L // 2, L],
                   base_length=L // 2)
    spelled = run(model_dir, corpus, lengths=[L // 2, L], methods=[
        "vanilla:original_max_position_embeddings=16", "clex:original_max_position_embeddings=16",
        "yarn:factor=2,original_max_position_embeddings=16"])
    own = run(model_dir, corpus, methods=["clex"], lengths=[L // 2, L])
    assert declared.training_length == L // 2 and own.training_length == L
    assert [r.ppl for r in declared.results] == [r.ppl for r in spelled.results]
    clex_at_L = {r.length: r.ppl for r in declared.results if r.method.startswith("clex")}
    assert clex_at_L[L] != {r.length: r.ppl for r in own.results}[L]  # t = 2 over L = 16, t = 1 over 32


def test_the_cli_flag_reaches_the_report_and_a_conflict_is_one_line(model_dir, corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--model", model_dir, "--methods", "vanilla,clex", "--lengths", "16,32",
                 "--data", corpus, "--samples", "2", "--tokenizer", "bytes", "--base-length", "16",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["training_length"] == 16
    assert "L = 16" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", model_dir, "--methods", "clex:original_max_position_embeddings=8",
                 "--lengths", "16", "--data", corpus, "--tokenizer", "bytes", "--base-length", "16",
                 "--out", str(tmp_path / "two"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "L given twice" in err and len(err.splitlines()) == 1
    assert main(["chat", "--model", model_dir, "--base-length", "16", "--tokenizer", "bytes"]) == 2
    assert "give --method too" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["eval", "ppl", "--lengths", "16", "--data", "CORPUS", "--tokenizer", "bytes", "--no-progress"],
    ["eval", "passkey", "--lengths", "64", "--tokenizer", "bytes", "--no-progress"],
    ["train", "--data", "CORPUS", "--tokenizer", "bytes", "--steps", "1", "--no-progress"],
])
def test_a_bad_base_length_is_one_line_and_writes_nothing(model_dir, corpus, tmp_path, capsys, argv):  # noqa: F811
    out = tmp_path / "out"
    argv = [corpus if a == "CORPUS" else a for a in argv]
    assert main([*argv, "--model", model_dir, "--base-length", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--base-length must be a positive integer" in err and len(err.splitlines()) == 1
    assert not out.exists()
