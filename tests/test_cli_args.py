"""Flags from config dataclasses: both spellings, booleans, and values reaching the config."""

import argparse

from preft_rl import PreftGRPOConfig
from preft_rl.trainers.cli_args import add_dataclass_arguments, dataclass_from_args


def parse(argv: list[str]) -> PreftGRPOConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, PreftGRPOConfig, defaults={"max_steps": 7})
    return dataclass_from_args(PreftGRPOConfig, parser.parse_args(argv))


def test_dash_and_underscore_flags_set_the_same_field():
    assert parse(["--output-dir", "a"]).output_dir == "a"
    assert parse(["--output_dir", "b", "--learning_rate", "0.5"]).output_dir == "b"
    assert parse(["--learning-rate", "0.5"]).learning_rate == 0.5


def test_defaults_booleans_and_optional_strings():
    config = parse([])
    assert config.max_steps == 7 and config.bf16 is False
    assert parse(["--bf16"]).bf16 is True and parse(["--no-bf16"]).bf16 is False
    assert parse(["--report-to", "tensorboard"]).report_to == ["tensorboard"]


def test_study_flags_are_never_abbreviated_and_a_study_sets_its_own_seed_and_folders(capsys):
    """`--seed 3` once meant `--seeds 3` by prefix and started a study; a study's per-run seed, output folder and
    checkpointing are its own (--seeds, --out), so those trainer flags are not offered."""
    import pytest

    from preft_rl.cli import main

    for flag in ("--seed", "--output-dir", "--save-steps", "--method"):
        with pytest.raises(SystemExit) as exit_info:
            main(["study", flag, "3"])
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {flag} 3" in capsys.readouterr().err
