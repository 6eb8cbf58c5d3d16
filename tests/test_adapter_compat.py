"""Adapters saved under one environment load and predict the same under another (an older peft and transformers).

MAP_ADAPTER_RUN names a directory: the first run of this test (CI: the current versions) trains the demo there
and writes reference.csv with submit.py; a later run (CI: the minimum versions) finds it and only predicts.
Without the variable both happen here, in a temporary directory.
"""
import importlib.metadata
import json
import os

import pandas as pd
import pytest

import config
import submit
import train

QUESTIONS = "31772,33471"


@pytest.fixture
def saved_run(tmp_path):
    """(the demo run's dir, the library versions it was saved with)."""
    directory = os.environ.get("MAP_ADAPTER_RUN") or str(tmp_path / "saved")
    versions_path = os.path.join(directory, "saved_with.json")
    if not os.path.isfile(versions_path):
        demo = ["--demo", "--demo-output-dir", directory, "--questions", QUESTIONS]
        saved = config.snapshot()
        assert train.main(demo + ["--epochs", "2"]) == 0
        config.update(saved)
        assert submit.main(demo + ["--submission", os.path.join(directory, "reference.csv")]) == 0
        config.update(saved)
        with open(versions_path, "w") as handle:
            json.dump({name: importlib.metadata.version(name) for name in train.LIBRARIES}, handle)
    with open(versions_path) as handle:
        return directory, json.load(handle)


def test_saved_adapters_predict_the_reference_submission(saved_run, tmp_path, capsys):
    directory, saved_with = saved_run
    here = {name: importlib.metadata.version(name) for name in train.LIBRARIES}
    path = tmp_path / "submission.csv"
    code = submit.main(["--demo", "--demo-output-dir", directory, "--questions", QUESTIONS, "--submission", str(path)])
    assert code == 0, f"saved with {saved_with}, loaded with {here}"
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 of ")  # both questions by their model
    reference = pd.read_csv(os.path.join(directory, "reference.csv"), keep_default_na=False, dtype=str)
    assert pd.read_csv(path, keep_default_na=False, dtype=str).equals(reference), f"saved with {saved_with}, loaded with {here}"
