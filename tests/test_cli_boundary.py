"""The command line's one boundary with the library: ``clex train``'s flags derived from ``TrainConfig``'s fields
(``add_options``), and library messages put in the command line's words (``flag_words``)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from clex.cli.main import _flags, add_options, build_parser, flag_words, main
from clex.errors import BadInput
from clex.training.options import TrainConfig, validate

FIELDS = dataclasses.fields(TrainConfig)
CHOICES = {f.name: f.metadata["choices"] for f in FIELDS if f.metadata.get("choices")}


def flag_of(field: dataclasses.Field) -> str:
    return "--no-progress" if field.name == "show_progress" else "--" + field.name.replace("_", "-")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", exit_on_error=False)
    add_options(parser, TrainConfig)
    return parser


# --- flag_words -------------------------------------------------------------------------------------------
def test_an_option_named_in_backticks_becomes_the_subcommands_flag():
    flags = _flags(build_parser(), "train")
    text = "`max_factor` given twice; `train_length` must be at least 2 and `show_progress` is off"
    assert flag_words(text, flags) == "--max-factor given twice; --train-length must be at least 2 and " \
                                      "--no-progress is off"
    assert flag_words("`frobnicate` is not an option; `lr` is", flags) == "`frobnicate` is not an option; --lr is"
    assert flag_words("`Max_factor`, `max-factor` and max_factor", flags) == "`Max_factor`, `max-factor` and max_factor"


def test_a_name_the_subcommand_lacks_is_left_as_the_library_wrote_it():
    export = _flags(build_parser(), "export")
    assert flag_words("`max_factor` and `factor`", export) == "`max_factor` and --factor"
    ppl = _flags(build_parser(), "eval ppl")
    assert flag_words("`lengths` and `lora`", ppl) == "--lengths and `lora`"  # ppl has --lengths, not --lora
    assert flag_words("`max_factor`", {}) == "`max_factor`"


def test_the_command_line_reports_a_library_refusal_with_the_flag(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--method", "pi:factor=2",
                 "--max-factor", "4"])
    assert code == 2 and "--max-factor applies to --method clex" in capsys.readouterr().err
    code = main(["train", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--steps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps must be a positive integer" in err and "`steps`" not in err


# --- add_options ------------------------------------------------------------------------------------------
def test_every_field_has_a_flag_with_its_default_and_choices():
    actions = {a.dest: a for a in train_parser()._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in FIELDS}
    for f in FIELDS:
        action = actions[f.name]
        assert action.option_strings == [flag_of(f)], f.name
        if f.default is dataclasses.MISSING:
            assert action.required, f.name
        else:
            assert not action.required and action.default == f.default, f.name
        assert action.choices == f.metadata.get("choices"), f.name
        if f.type == "bool":
            assert isinstance(action, argparse._StoreFalseAction if f.default else argparse._StoreTrueAction), f.name


def test_parsing_only_the_required_flags_gives_the_configs_defaults():
    args = train_parser().parse_args(["--model", "m", "--out", "o"])
    assert TrainConfig(**vars(args)) == TrainConfig(model="m", out="o")


def test_flags_parse_to_the_fields_types():
    args = train_parser().parse_args(["--model", "m", "--out", "o", "--steps", "7", "--lr", "0.5", "--clex-lr", "1e-3",
                                      "--no-progress", "--pack", "--layout", "chunks", "--fsdp", "full_shard"])
    cfg = TrainConfig(**vars(args))
    assert (cfg.steps, cfg.lr, cfg.clex_lr, cfg.show_progress, cfg.pack, cfg.layout, cfg.fsdp) == \
        (7, 0.5, 1e-3, False, True, "chunks", "full_shard")
    assert type(cfg.steps) is int and type(cfg.lr) is float
    with pytest.raises(argparse.ArgumentError):
        train_parser().parse_args(["--model", "m", "--out", "o", "--layout", "diagonal"])
    with pytest.raises(argparse.ArgumentError):
        train_parser().parse_args(["--model", "m", "--out", "o", "--steps", "many"])


def test_clex_train_help_lists_every_fields_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    for f in FIELDS:
        assert re.search(rf"{re.escape(flag_of(f))}\b", shown), f.name
    for extra in ("--max-factor", "--base-length", "--joint-clip"):
        assert extra in shown
    assert "(default: scatter)" in shown and "{scatter,chunks}" in shown


# --- validate ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHOICES))
def test_validate_refuses_a_value_outside_the_choices_naming_the_option(name):
    listed = re.escape(", ".join(CHOICES[name]))
    with pytest.raises(BadInput, match=f"`{name}` must be one of {listed}, got 'nonsense'"):
        validate(TrainConfig(model="m", out="o", **{name: "nonsense"}))
    for choice in CHOICES[name]:  # and every listed choice is valid
        validate(TrainConfig(model="m", out="o", **{name: choice}))


def test_every_choice_field_is_checked():
    assert set(CHOICES) >= {"layout", "t_sampling", "gradient_checkpointing", "format", "precision", "fsdp",
                            "on_bad_record"}
