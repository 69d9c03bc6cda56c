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
