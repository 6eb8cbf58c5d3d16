"""config.py: one declaration per setting, from which argparse, each script's flags and README's table derive."""
import os

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_options_table_is_the_one_config_prints():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    start = lines.index("| flag | setting | default | scripts | meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert lines[start:end] == config.options_table().splitlines(), "README.md's options table differs: paste `python config.py`"


def test_every_setting_is_a_module_variable_with_its_default():
    for name, entry in config.SETTINGS.items():
        assert getattr(config, name) == entry.default, name
    assert config.snapshot() == {name: entry.default for name, entry in config.SETTINGS.items()}
    assert config.EPOCHS == 3 and config.QUESTION_IDS[0] == 31772 and config.get_summary_dir() == os.path.join("ver_2", "summary")


def test_each_script_takes_its_own_settings():
    names = {script: [entry.name for entry in config.settings_of(script)] for script in ("train", "submit", "baseline")}
    assert "SUBMISSION_PATH" not in names["train"] and "EPOCHS" in names["train"]
    assert "SUBMISSION_PATH" in names["submit"] and "EPOCHS" not in names["submit"]
    assert names["baseline"] == ["TRAIN_DATA_PATH", "OUTPUT_DIR", "QUESTION_IDS", "VAL_FRACTION", "SEED", "FOLDS"]
    with pytest.raises(SystemExit):
        config.parse_args("x", "submit", ["--epochs", "5"])


def test_submit_batch_size_is_the_evaluation_batch_size():
    config.parse_args("x", "submit", ["--batch-size", "7", "--no-merge-lora"])
    assert (config.EVAL_BATCH_SIZE, config.TRAIN_BATCH_SIZE, config.MERGE_LORA) == (7, 32, False)
    assert config.GIVEN == {"EVAL_BATCH_SIZE", "MERGE_LORA"}
    config.parse_args("x", "train", ["--batch-size", "5", "--eval-batch-size=9"])
    assert (config.TRAIN_BATCH_SIZE, config.EVAL_BATCH_SIZE) == (5, 9)
    assert config.GIVEN == {"TRAIN_BATCH_SIZE", "EVAL_BATCH_SIZE"}


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        config.parse_args("x", "train", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {auto,bf16,fp16,fp32}" in text and "(default: create_prompt_v1)" in text
    assert "--merge-lora" not in text and "--no-overwrite" in text
