"""Seeds: train.py --seeds trains each model once per model seed on one split; submit.py averages them."""
import os

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

import config
import ensemble
import submit
from conftest import run_train, train_args
from utils import correctness_of, decode_top_k, map_at_k, read_competition_csv, read_json

QUESTIONS = [31772, 33471]
FLAGS = ["--questions", ",".join(map(str, QUESTIONS)), "--folds", "2", "--epochs", "2", "--seeds", "7,8"]


@pytest.fixture(scope="module")
def seeds_run(tiny_model, train_csv, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("seeds"))
    code = run_train(train_args(tiny_model, train_csv, output_dir, *FLAGS))
    return {"output_dir": output_dir, "code": code, "second": os.path.join(output_dir, "seed_8")}


def adapter(run_dir, question_id, fold):
    return load_file(os.path.join(run_dir, f"question_{question_id}", f"fold_{fold}", "best", "adapter_model.safetensors"))


def oof(run_dir, question_id):
    return pd.read_csv(os.path.join(run_dir, f"question_{question_id}", "oof_best_map3.csv"), keep_default_na=False,
                       dtype={"row_id": str, "label": str})


def test_each_seed_trains_its_own_models_on_one_split(seeds_run):
    assert seeds_run["code"] == 0
    first, second = seeds_run["output_dir"], seeds_run["second"]
    for question_id in QUESTIONS:
        results = [read_json(os.path.join(run, "summary", f"question_{question_id}_results.json")) for run in (first, second)]
        assert [r["model_seed"] for r in results] == [7, 8]
        assert results[0]["training_settings"]["SEED"] == results[1]["training_settings"]["SEED"] == config.SEED
        # The same split: every row in the same fold in both runs.
        tables = [oof(run, question_id) for run in (first, second)]
        assert tables[0][["row_id", "fold", "label"]].equals(tables[1][["row_id", "fold", "label"]])
        # Distinct models: other LoRA weights and head, other out-of-fold probabilities.
        for fold in (0, 1):
            weights = [adapter(run, question_id, fold) for run in (first, second)]
            assert weights[0].keys() == weights[1].keys()
            assert any(not np.allclose(weights[0][name], weights[1][name]) for name in weights[0])
        assert not np.allclose(tables[0].iloc[:, 3:].to_numpy(float), tables[1].iloc[:, 3:].to_numpy(float))


def test_the_summary_scores_each_seed_and_their_average(seeds_run, train_csv):
    record = read_json(os.path.join(seeds_run["output_dir"], "summary", "seeds.json"))
    assert record["seeds"] == [7, 8] and record["runs"] == [".", "seed_8"]
    # Recomputed from the raw out-of-fold files: per-question models only, so each run's OOF is its question models'.
    df = read_competition_csv(train_csv, labelled=True)
    correct = dict(zip(df["row_id"], correctness_of(df)))
    truth, seeds, average = [], [[], []], []
    for question_id in QUESTIONS:
        tables = [oof(run, question_id) for run in (seeds_run["output_dir"], seeds_run["second"])]
        labels = list(tables[0].columns[3:])
        verdicts = [correct[row] for row in tables[0]["row_id"]]
        probs = [table[labels].to_numpy(float) for table in tables]
        truth += list(tables[0]["label"])
        for number, seed_probs in enumerate(probs):
            seeds[number] += decode_top_k(seed_probs, labels, verdicts, True)
        average += decode_top_k((probs[0] + probs[1]) / 2, labels, verdicts, True)
    scores = record["best_map3"]
    assert scores["rows"] == len(truth)
    assert scores["seeds_map3"] == pytest.approx([map_at_k(truth, seeds[0]), map_at_k(truth, seeds[1])], abs=1e-12)
    assert scores["average_map3"] == pytest.approx(map_at_k(truth, average), abs=1e-12)
    summary = read_json(os.path.join(seeds_run["output_dir"], "summary", "all_questions_summary.json"))
    assert summary["seeds"] == record


def test_submit_averages_the_seeds(seeds_run, tiny_model, test_csv, tmp_path):
    config.update({"MODEL_NAME": tiny_model, "QUESTION_IDS": QUESTIONS})
    test_df = read_competition_csv(test_csv, labelled=False)
    test_df = test_df[test_df["QuestionId"].isin(QUESTIONS)].reset_index(drop=True)
    predictors = submit.load_predictors(tiny_model, ["cpu"])
    alone = []
    for run_dir in (seeds_run["output_dir"], seeds_run["second"]):
        with ensemble.in_run(run_dir):
            alone.append(submit.run_probabilities(test_df, ["cpu"], lambda _: predictors, submit.tqdm(disable=True)))
    path = tmp_path / "submission.csv"
    assert submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", seeds_run["output_dir"],
                        "--questions", ",".join(map(str, QUESTIONS)), "--submission", str(path)]) == 0
    written = pd.read_csv(path, keep_default_na=False, dtype=str).set_index("row_id")
    disagreements = 0
    for question_id, rows in test_df.groupby("QuestionId"):
        parts = [run[question_id] for run in alone]
        assert parts[0][0] == parts[1][0]  # the same labels, in the same order
        expected = submit.decode(parts[0][0], (parts[0][1] + parts[1][1]) / 2, parts[0][2], rows)
        assert [" ".join(labels) for labels in expected] == list(written.loc[rows["row_id"].astype(str), "Category:Misconception"])
        disagreements += sum(a != b for a, b in zip(submit.decode(*parts[0][:3], rows), submit.decode(*parts[1][:3], rows)))
    assert disagreements > 0  # the seeds predict differently somewhere: the average is not either seed alone


def test_a_rerun_trains_nothing_and_bad_seeds_stop_early(seeds_run, tiny_model, train_csv, caplog):
    caplog.set_level("INFO")
    assert run_train(train_args(tiny_model, train_csv, seeds_run["output_dir"], *FLAGS)) == 0
    assert "results complete, skipping" in caplog.text
    assert not [record for record in caplog.records if "step" in record.getMessage() and "validation MAP@3" in record.getMessage()]
    for seeds in ("7,7", "7,x"):
        assert run_train(train_args(tiny_model, train_csv, seeds_run["output_dir"], *FLAGS, "--seeds", seeds)) == 2
