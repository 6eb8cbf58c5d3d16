"""Ensembles of runs: submit.py --output-dir A,B, weights fitted on the runs' out-of-fold files (ensemble.py)."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import transformers

import config
import ensemble
import submit
from conftest import SINGLE_CLASS_QUESTION, run_train, train_args
from test_benchmarks import load_script
from utils import read_competition_csv, read_json

QUESTIONS = [31772, 33471, SINGLE_CLASS_QUESTION]
TRAINED = QUESTIONS[:2]  # the single-class question has no model


@pytest.fixture(scope="module")
def two_runs(tiny_model, train_csv, tmp_path_factory):
    """Two 2-fold runs of per-question models with other recipes: another learning rate and label space."""
    root = tmp_path_factory.mktemp("ensemble")
    common = ["--questions", ",".join(map(str, QUESTIONS)), "--folds", "2", "--epochs", "2"]
    runs = [str(root / "a"), str(root / "b")]
    codes = [run_train(train_args(tiny_model, train_csv, runs[0], *common)),
             run_train(train_args(tiny_model, train_csv, runs[1], *common, "--lr", "0.002", "--label-space", "suffix"))]
    assert codes == [0, 0]
    return runs


def submit_with(tiny_model, test_csv, train_csv, output_dir, path, *extra):
    return submit.main(["--model", tiny_model, "--test-data", test_csv, "--train-data", train_csv, "--output-dir",
                        output_dir, "--questions", ",".join(map(str, QUESTIONS)), "--submission", str(path), *extra])


def read_submission(path):
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def test_fitted_weights_reproduce_from_the_out_of_fold_files(two_runs, tiny_model, test_csv, train_csv, tmp_path, capsys):
    path = tmp_path / "submission.csv"
    assert submit_with(tiny_model, test_csv, train_csv, ",".join(two_runs), path) == 0
    record = read_json(tmp_path / "ensemble.json")
    out = capsys.readouterr().out
    assert f"ensemble of {', '.join(two_runs)}: weights {'/'.join(f'{w:g}' for w in record['weights'])}" in out
    # The table shows each question's weights.
    for question_id in QUESTIONS[:2]:
        weights = ensemble.weights_of(record, question_id)
        line = next(line for line in out.splitlines() if line.strip().startswith(str(question_id)))
        hows = ["model (2 folds)" if weight > 0 else "not run" for weight in weights]
        assert f"{weights[0]:g} a: {hows[0]}; {weights[1]:g} b: {hows[1]}" in line
    config.update({"QUESTION_IDS": QUESTIONS})
    assert ensemble.fit_record(read_competition_csv(train_csv, labelled=True), two_runs, "best_map3") == record

    # Independently of ensemble.py: each run alone scores what compare_oof scores from its raw files, and the shared
    # weights score the best of the grid over both questions' rows.
    per_question, _ = load_script("compare_oof").compare(train_csv, *two_runs, "best_map3", [w / 10 for w in range(11)])
    assert set(record["questions"]) == {str(q) for q in per_question}
    rows = sum(n for n, _ in per_question.values())
    for question_id, (n, scores) in per_question.items():
        entry = record["questions"][str(question_id)]
        assert entry["rows"] == n and entry["runs_map3"] == pytest.approx([scores["A"], scores["B"]], abs=1e-12)
    grid = {w / 10: sum(n * scores[f"blend {w / 10:g}"] for n, scores in per_question.values()) / rows for w in range(11)}
    assert record["shared_map3"] == pytest.approx(max(grid.values()), abs=1e-12)
    assert grid[record["weights"][1]] == pytest.approx(max(grid.values()), abs=1e-12)
    assert record["runs_map3"] == pytest.approx([grid[0.0], grid[1.0]], abs=1e-12)


def test_a_member_at_weight_0_changes_nothing(two_runs, tiny_model, test_csv, train_csv, tmp_path, monkeypatch):
    alone = {}
    for name, run in zip("ab", two_runs):
        assert submit_with(tiny_model, test_csv, train_csv, run, tmp_path / f"{name}.csv") == 0
        alone[name] = read_submission(tmp_path / f"{name}.csv")
    assert not alone["a"].equals(alone["b"])  # the two recipes predict differently: the comparison can fail
    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    predicted = record_predicted_runs(monkeypatch)
    for weights, expected in (("1,0", "a"), ("0,1", "b")):
        path = tmp_path / f"ensemble_{expected}.csv"
        assert submit_with(tiny_model, test_csv, train_csv, ",".join(two_runs), path, "--ensemble-weights", weights) == 0
        pd.testing.assert_frame_equal(read_submission(path), alone[expected])
        assert read_json(tmp_path / "ensemble.json") == {"runs": two_runs, "weights": [float(w) for w in weights.split(",")],
                                                         "questions": {}, "fitted": False}
        # The run at weight 0 predicts no question the other one has a model for; it stands in, by label
        # frequencies, for the test file's questions that neither run trained.
        weighted, other = two_runs["ab".index(expected)], two_runs[1 - "ab".index(expected)]
        assert predicted[0] == (weighted, test_questions(test_csv))
        assert [(run, set(questions) & set(TRAINED)) for run, questions in predicted[1:]] == [(other, set())]
        predicted.clear()
    assert len(loads) == 2  # the two runs share a base model: one load per submission


def test_questions(test_csv):
    return sorted(int(qid) for qid in read_competition_csv(test_csv, labelled=False)["QuestionId"].unique())


def record_predicted_runs(monkeypatch):
    """[(run dir, its questions predicted)], one entry per call of submit.run_probabilities."""
    predicted = []
    original = submit.run_probabilities

    def recording(test_df, *args):
        predicted.append((config.OUTPUT_DIR, sorted(int(qid) for qid in test_df["QuestionId"].unique())))
        return original(test_df, *args)

    monkeypatch.setattr(submit, "run_probabilities", recording)
    return predicted


def test_a_run_at_weight_0_stands_in_where_the_weighted_run_is_unusable(two_runs, tiny_model, test_csv, train_csv,
                                                                        tmp_path, monkeypatch):
    """Run a's adapters of question 33471 are gone: there run b, at weight 0, predicts as it would alone."""
    broken = tmp_path / "a"
    shutil.copytree(two_runs[0], broken)
    for fold in range(2):
        shutil.rmtree(broken / "question_33471" / f"fold_{fold}")
    assert submit_with(tiny_model, test_csv, train_csv, two_runs[1], tmp_path / "b.csv") == 0
    predicted = record_predicted_runs(monkeypatch)
    path = tmp_path / "ensemble.csv"
    assert submit_with(tiny_model, test_csv, train_csv, f"{broken},{two_runs[1]}", path, "--ensemble-weights", "1,0") == 0
    assert predicted[0] == (str(broken), test_questions(test_csv))
    assert [(run, set(questions) & set(TRAINED)) for run, questions in predicted[1:]] == [(two_runs[1], {33471})]
    test = read_competition_csv(test_csv, labelled=False)
    rows = test["QuestionId"].eq(33471).to_numpy()
    assert rows.any()
    pd.testing.assert_frame_equal(read_submission(path)[rows], read_submission(tmp_path / "b.csv")[rows])


def test_bad_input_is_one_line_and_exit_2(two_runs, tiny_model, test_csv, train_csv, tmp_path, capsys):
    no_oof = tmp_path / "no_oof"
    shutil.copytree(two_runs[1], no_oof)
    for question_id in QUESTIONS:
        for name in ("oof_best_map3.csv", "oof_best.csv"):
            if os.path.isfile(no_oof / f"question_{question_id}" / name):
                os.remove(no_oof / f"question_{question_id}" / name)
    other_rows = tmp_path / "other_rows"
    shutil.copytree(two_runs[1], other_rows)
    for question_id in QUESTIONS[:2]:
        oof = other_rows / f"question_{question_id}" / "oof_best_map3.csv"
        table = pd.read_csv(oof, keep_default_na=False, dtype={"row_id": str})
        table.assign(row_id="x" + table["row_id"]).to_csv(oof, index=False)
    missing = tmp_path / "missing.csv"
    cases = [
        ((f"{two_runs[0]},{no_oof}",), f"error: --output-dir {no_oof}: no out-of-fold files (question_<id>/oof_best_map3.csv, "
                                        "global/) with training results (summary/); an ensemble fits its weights on them"),
        ((f"{two_runs[0]},{other_rows}",), f"error: --output-dir {two_runs[0]},{other_rows}: the runs share no out-of-fold rows"),
        ((f"{two_runs[0]},{tmp_path / 'typo'}",), f"error: --output-dir {tmp_path / 'typo'}: no training results"),
        ((",".join(two_runs), "--train-data", str(missing)), f"error: --train-data {missing}: file not found"),
        ((two_runs[0], "--ensemble-weights", "1,0"), "error: --ensemble-weights 1,0: weighs the runs of --output-dir"),
        ((",".join(two_runs), "--ensemble-weights", "1"), "error: --ensemble-weights 1.0: give one non-negative weight"),
        ((",".join(two_runs), "--ensemble-weights", "1,x"), "error: --ensemble-weights 1,x: not a comma list of numbers"),
        ((",".join(two_runs), "--model", f"{tiny_model},{tiny_model},{tiny_model}"), f"error: --model {tiny_model},"),
    ]
    for (output_dir, *extra), message in cases:
        path = tmp_path / "submission.csv"
        argv = ["--model", tiny_model, "--test-data", test_csv, "--train-data", train_csv, "--output-dir", output_dir,
                "--questions", ",".join(map(str, QUESTIONS)), "--submission", str(path), *extra]
        assert submit.main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, (message, err)
        assert not path.exists()


def test_compare_oof_scores_the_ensemble_each_fold_with_weights_fitted_on_the_others(two_runs, train_csv, capsys):
    compare_oof = load_script("compare_oof")
    per_question, compared = compare_oof.main(["--train-data", train_csv, "--ensemble", *two_runs])
    config.update({"QUESTION_IDS": QUESTIONS})
    df = read_competition_csv(train_csv, labelled=True)
    vectors = ensemble.grid(2)
    scores, questions, folds = ensemble.score_grid(df, ensemble.run_oofs(df, two_runs, "best_map3"), vectors)
    honest = np.zeros(len(questions))
    for fold in (0, 1):
        others = folds != fold
        shared = np.argmax(scores[:, others].mean(axis=1))
        # With two folds a question's own weights would be checked on one fold only: the shared ones score it.
        honest[folds == fold] = scores[shared, folds == fold]
    assert np.array_equal(ensemble.cross_fold_scores(scores, questions, folds), honest)
    rows = sum(n for n, _ in per_question.values())
    overall = sum(n * entry["ensemble (cross-fold)"] for n, entry in per_question.values()) / rows
    assert overall == pytest.approx(honest.mean(), abs=1e-12)
    assert [name for name, *_ in compared] == ["ensemble (cross-fold) - a", "ensemble (cross-fold) - b"]
    assert "ensemble (cross-fold)" in capsys.readouterr().out


def test_a_question_keeps_its_own_weights_only_where_they_win_on_held_out_folds():
    vectors = ensemble.grid(2)
    assert vectors.tolist()[0] == [0.5, 0.5] and len(vectors) == 11
    rng = np.random.default_rng(0)
    questions = np.repeat([1, 2], 60)
    folds = np.tile(np.repeat([0, 1, 2], 20), 2)
    scores = rng.uniform(0, 0.01, (len(vectors), len(questions)))
    first_only = int(np.flatnonzero(vectors[:, 0] == 1)[0])
    second_only = int(np.flatnonzero(vectors[:, 1] == 1)[0])
    scores[second_only, questions == 1] += 1.0  # question 1 always prefers the second run, on every fold
    scores[first_only, questions == 2] += 1.5  # and question 2, by more, the first: the shared vector's choice
    shared, own = ensemble.fit(scores, questions, folds, np.ones(len(questions), dtype=bool))
    assert shared == first_only and own == {1: second_only}
    # Where question 1's preference holds on one fold only, held-out folds do not confirm it: the shared vector.
    scores[second_only, (questions == 1) & (folds > 0)] -= 1.0
    assert ensemble.fit(scores, questions, folds, np.ones(len(questions), dtype=bool)) == (first_only, {})


def test_each_run_takes_the_model_given_for_it_or_the_one_it_recorded(two_runs, tiny_model, monkeypatch):
    monkeypatch.setattr(config, "GIVEN", set())  # no --model on the command line
    recorded = read_json(os.path.join(two_runs[0], "summary", "question_31772_results.json"))["training_settings"]["MODEL_NAME"]
    assert recorded == tiny_model and ensemble.run_models(two_runs) == [tiny_model, tiny_model]
    config.GIVEN.add("MODEL_NAME")
    config.update({"MODEL_NAME": "/models/x,/models/y"})
    assert ensemble.run_models(two_runs) == ["/models/x", "/models/y"]
    config.update({"MODEL_NAME": "/models/x"})
    assert ensemble.run_models(two_runs) == ["/models/x", "/models/x"]
