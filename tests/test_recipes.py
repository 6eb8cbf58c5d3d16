"""Recipes and stages: one command trains a global model then per-question models from it; stalls; each question's
source for submit.py; the traps of the two-stage path."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import config
import report
import sources
import submit
import train
from conftest import SINGLE_CLASS_QUESTION, STAGE_FLAGS, STAGE_QUESTIONS, file_hash, run_train, train_args
from utils import decode_top_k, read_competition_csv, read_json, read_question_results

QUESTIONS, QUESTION_FLAGS = STAGE_QUESTIONS, STAGE_FLAGS


def results(output_dir, name):
    return read_json(os.path.join(output_dir, "summary", "global_results.json" if name == config.GLOBAL
                                  else f"question_{name}_results.json"))


def write_recipe(path, text):
    path.write_text(text)
    return str(path)


def test_a_recipe_sets_settings_and_a_flag_overrides_it(tmp_path):
    recipe = write_recipe(tmp_path / "r.py", 'EPOCHS = 7\nLEARNING_RATE = 1e-3\nSTAGES = [{"SCOPE": "global", "EPOCHS": 9}, {}]\n')
    config.parse_args("x", "train", [recipe, "--lr", "0.5"], recipe=config.DEFAULT_RECIPE)
    assert (config.EPOCHS, config.LEARNING_RATE, config.RECIPE) == (7, 0.5, recipe)
    stages = train.run_stages()
    assert [(s["SCOPE"], s["EPOCHS"], s["LEARNING_RATE"], s["INIT_FROM"]) for s in stages] == [
        ("global", 9, 0.5, ""), ("question", 7, 0.5, config.OUTPUT_DIR)]
    # A flag wins over the stage's value too; --scope keeps that scope's stages only.
    config.parse_args("x", "train", [recipe, "--epochs", "2", "--scope", "global"], recipe=config.DEFAULT_RECIPE)
    assert [(s["SCOPE"], s["EPOCHS"]) for s in train.run_stages()] == [("global", 2)]
    # Without a recipe: the default one, a global stage then a question stage.
    config.parse_args("x", "train", [], recipe=config.DEFAULT_RECIPE)
    assert config.RECIPE == config.DEFAULT_RECIPE and [s["SCOPE"] for s in train.run_stages()] == ["global", "question"]
    assert config.LABEL_SPACE == "suffix"


@pytest.mark.parametrize("text, message", [
    ("EPOCS = 3\n", "EPOCS is not a setting of train"),
    ("EPOCHS = '3'\n", "EPOCHS = '3' does not fit its default 3"),
    ("STAGES = [{'SCOPE': 'everything'}]\n", "stage 1: SCOPE = 'everything' does not fit"),
    ("STAGES = []\n", "STAGES must be a non-empty list of dicts of settings"),
])
def test_a_bad_recipe_is_a_one_line_error_naming_file_and_setting(tmp_path, capsys, text, message):
    recipe = write_recipe(tmp_path / "bad.py", text)
    with pytest.raises(SystemExit) as stopped:
        train.main([recipe, "--output-dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f": error: {recipe}: " in error and message in error
    assert not os.path.exists(tmp_path / "out")


def test_one_invocation_trains_both_stages(two_stages):
    output_dir = two_stages["output_dir"]
    assert two_stages["code"] == 0
    global_result = results(output_dir, config.GLOBAL)
    assert global_result["status"] == "succeeded" and global_result["training_settings"]["SCOPE"] == "global"
    assert global_result["training_settings"]["EPOCHS"] == 2 and global_result["recipe"] == config.DEFAULT_RECIPE
    for question_id in QUESTIONS[:2]:
        result = results(output_dir, question_id)
        assert result["init_from"] == [os.path.join(output_dir, "global", f"fold_{k}", "best") for k in range(2)]
        assert result["init_from_hash"] == file_hash(os.path.join(output_dir, "summary", "global_results.json"))
        assert result["training_settings"]["LABEL_SPACE"] == "suffix"  # the recipe's
    assert results(output_dir, SINGLE_CLASS_QUESTION)["status"] == "skipped"
    # The finished folds were kept only until their model was complete.
    assert not [path for path, _, _ in os.walk(output_dir) if path.endswith("finished")]


def test_a_rerun_retrains_nothing(two_stages, tiny_model, train_csv, monkeypatch):
    before = {name: results(two_stages["output_dir"], name) for name in [config.GLOBAL, *QUESTIONS]}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(train, "train_fold", no_training)
    args = train_args(tiny_model, train_csv, two_stages["output_dir"], *QUESTION_FLAGS, recipe=config.DEFAULT_RECIPE)
    assert run_train(args) == 0
    assert {name: results(two_stages["output_dir"], name) for name in before} == before


def test_each_question_gets_the_best_source_out_of_fold(two_stages):
    record = read_json(os.path.join(two_stages["output_dir"], "summary", "sources.json"))
    for checkpoint in sources.CHECKPOINTS:
        entries = record[checkpoint]["questions"]
        assert set(entries) == set(map(str, QUESTIONS))  # the skipped question: the global model alone
        assert entries[str(SINGLE_CLASS_QUESTION)]["global_weight"] == 1.0
        for question_id in QUESTIONS[:2]:
            entry = entries[str(question_id)]
            assert set(entry["map3"]) == {"0", "0.25", "0.5", "0.75", "1"}
            assert entry["map3"][f"{entry['global_weight']:g}"] == max(entry["map3"].values())
    summary = read_json(os.path.join(two_stages["output_dir"], "summary", "all_questions_summary.json"))
    assert summary["sources"] == record


def test_choice_prefers_the_better_source_ties_the_lower_weight_and_scores_each_fold_by_the_others():
    folds = np.array([0, 0, 1, 1])
    scores = {0.0: np.array([1, 1, 0, 0.]), 0.5: np.array([1, 1, 0, 0.]), 1.0: np.array([0, 0, 1, 0.5])}
    weight, cross_fold = sources.choose(scores, folds, stalled=False)
    assert weight == 0.0  # 0.5 on average for 0 and 0.5 (tie: the lower weight), 0.375 for 1
    # Fold 0's rows take fold 1's choice (1.0) and the other way round.
    np.testing.assert_allclose(cross_fold, [0, 0, 0, 0])
    assert sources.choose(scores, folds, stalled=True)[0] == 1.0
    assert sources.choose(scores, np.zeros(4, dtype=int), stalled=False)[1] is None


def test_stall_test_needs_a_lead_beyond_the_noise():
    prior = np.array([1.0, 0.0] * 50)
    assert train.stall_test(prior, prior)["stalled"]  # the prior itself
    better = prior.copy()
    better[1:40:2] = 1.0  # 20 of 100 rows right where the prior was wrong
    assert not train.stall_test(better, prior)["stalled"]
    slightly = prior.copy()
    slightly[1] = 1.0  # one row: within the noise
    verdict = train.stall_test(slightly, prior)
    assert verdict["stalled"] and verdict["lead_over_prior"] == pytest.approx(0.01)


def test_a_stalled_model_is_reported_and_its_question_predicted_by_the_global_model(
        two_stages, tiny_model, train_csv, test_csv, tmp_path, capsys, caplog):
    output_dir = tmp_path / "stalled"
    shutil.copytree(two_stages["output_dir"], output_dir)
    # Per-question models from scratch that cannot move from their prior head, beside the global model.
    args = train_args(tiny_model, train_csv, output_dir, *QUESTION_FLAGS, "--lr", "1e-12", "--head-init", "prior")
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert run_train(args) == 0
    table = capsys.readouterr().out
    for question_id in QUESTIONS[:2]:
        result = results(str(output_dir), question_id)
        assert result["stalled"] and result["lead_over_prior"] <= result["stall_margin"]
        assert any(record.getMessage().startswith(f"question {question_id} STALLED on the label prior: ")
                   for record in caplog.records)
        row = next(line for line in table.splitlines() if line.lstrip().startswith(str(question_id)))
        assert " stalled " in row and row.endswith("global model (own model stalled)")
    summary = read_json(os.path.join(output_dir, "summary", "all_questions_summary.json"))
    assert summary["per_question"][str(QUESTIONS[0])]["stalled"] is True
    config.update({"OUTPUT_DIR": str(output_dir)})
    bars = report.plot_map3_by_question(read_question_results(QUESTIONS), summary, str(tmp_path / "bars.png"))
    stalled_ticks = [tick for tick in bars.axes[0].get_yticklabels() if tick.get_text().endswith(" (stalled)")]
    assert sorted(tick.get_text() for tick in stalled_ticks) == [f"{q} (stalled)" for q in sorted(QUESTIONS[:2])]
    assert summary["sources"]["best_map3"]["questions"][str(QUESTIONS[0])]["global_weight"] == 1.0
    submission = tmp_path / "submission.csv"
    assert submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", str(output_dir),
                        "--submission", str(submission), "--questions", ",".join(map(str, QUESTIONS))]) == 0
    table = capsys.readouterr().out
    for question_id in QUESTIONS:
        line = next(line for line in table.splitlines() if line.split()[:1] == [str(question_id)])
        assert " global model (2 folds) " in line
    # --global-weight still forces one weight for all.
    assert submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", str(output_dir), "--submission",
                        str(submission), "--questions", ",".join(map(str, QUESTIONS)), "--global-weight", "0"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [str(QUESTIONS[0])])
    assert " model (2 folds) " in line and "global" not in line


def test_a_global_model_of_other_rows_is_retrained_and_refused_as_a_start(two_stages, tiny_model, train_csv, tmp_path, capsys):
    """Another --questions or --train-data: the saved global model is not complete for it, and --init-from refuses it
    before any question's results are touched (its labels or validation rows may differ)."""
    output_dir = two_stages["output_dir"]
    df = read_competition_csv(train_csv, labelled=True)
    config.parse_args("x", "train", train_args(tiny_model, train_csv, output_dir, *QUESTION_FLAGS, "--scope", "global",
                                               recipe=config.DEFAULT_RECIPE), recipe=config.DEFAULT_RECIPE)
    config.update({"PROMPT_VERSION": "create_prompt_global"})
    assert train.is_complete(config.GLOBAL, train.model_rows(df, config.GLOBAL))
    config.update({"QUESTION_IDS": QUESTIONS[:2]})
    assert not train.is_complete(config.GLOBAL, train.model_rows(df, config.GLOBAL))

    changed = tmp_path / "train.csv"
    raw = pd.read_csv(train_csv, keep_default_na=False, dtype=str)
    raw.drop(index=raw.index[raw["QuestionId"] == "33471"][0]).to_csv(changed, index=False)
    before = {q: results(output_dir, q) for q in QUESTIONS}
    capsys.readouterr()
    assert run_train(train_args(tiny_model, str(changed), output_dir, *QUESTION_FLAGS, "--label-space", "suffix",
                          "--init-from", output_dir)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --init-from {output_dir}: question 33471: its rows in {changed} are not those the global model trained "
        "on (retrain it with this --train-data and --questions)")
    assert {q: results(output_dir, q) for q in QUESTIONS} == before


def test_init_from_one_split_needs_the_same_validation_fraction(tiny_model, train_csv, tmp_path, capsys):
    output_dir = str(tmp_path)
    common = ["--questions", "33471", "--epochs", "1", "--label-space", "suffix"]
    assert run_train(train_args(tiny_model, train_csv, output_dir, *common, "--scope", "global")) == 0
    capsys.readouterr()
    assert run_train(train_args(tiny_model, train_csv, output_dir, *common, "--init-from", output_dir, "--val-fraction", "0.25")) == 2
    assert capsys.readouterr().err.strip() == (f"error: --init-from {output_dir}: the global model has --val-fraction 0.2, "
                                               "this run 0.25 (give --val-fraction 0.2)")


def test_question_models_of_a_retrained_global_model_are_retrained(two_stages, tiny_model, train_csv, tmp_path):
    output_dir = tmp_path / "retrained"
    shutil.copytree(two_stages["output_dir"], output_dir)
    path = output_dir / "summary" / "global_results.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "seconds": result["seconds"] + 1}))  # as a new training writes it anew
    args = train_args(tiny_model, train_csv, output_dir, *QUESTION_FLAGS, "--label-space", "suffix", "--init-from",
                      str(output_dir))
    config.parse_args("x", "train", args, recipe=config.DEFAULT_RECIPE)
    config.update({"PROMPT_VERSION": "create_prompt_global"})
    df = read_competition_csv(train_csv, labelled=True)
    assert not train.is_complete(33471, train.model_rows(df, 33471))
    assert train.changed_inputs(results(str(output_dir), 33471), train.model_rows(df, 33471)) == [
        "another starting model (--init-from, or its global model retrained)"]


def test_a_failed_global_model_fails_the_run_and_stops_the_stages(tiny_model, train_csv, tmp_path, monkeypatch):
    original = train.train_question
    trained = []

    def failing_global(question_id, *args):
        trained.append(question_id)
        if question_id == config.GLOBAL:
            raise RuntimeError("simulated out of memory")
        return original(question_id, *args)

    monkeypatch.setattr(train, "train_question", failing_global)
    assert run_train(train_args(tiny_model, train_csv, tmp_path, *QUESTION_FLAGS, recipe=config.DEFAULT_RECIPE)) == 1
    assert trained == [config.GLOBAL]
    assert results(str(tmp_path), config.GLOBAL)["status"] == "failed"


def test_a_model_stopped_in_its_last_fold_retrains_only_that_fold(tiny_model, train_csv, tmp_path, monkeypatch):
    original = train.train_fold
    folds = []

    def stopping_in_fold_2(question_id, fold, *args):
        folds.append(fold)
        if fold == 2 and len(folds) == 3:
            raise KeyboardInterrupt
        return original(question_id, fold, *args)

    monkeypatch.setattr(train, "train_fold", stopping_in_fold_2)
    args = train_args(tiny_model, train_csv, tmp_path, "--questions", "33471", "--folds", "3", "--epochs", "1")
    with pytest.raises(KeyboardInterrupt):
        run_train(args)
    assert run_train(args) == 0
    assert folds == [0, 1, 2, 2]
    result = results(str(tmp_path), 33471)
    assert result["status"] == "succeeded" and len(result["fold_results"]) == 3
    oof = pd.read_csv(tmp_path / "question_33471" / "oof_best.csv", keep_default_na=False)
    assert sorted(set(oof["fold"])) == [0, 1, 2] and len(oof) == result["rows"]


def test_a_question_model_started_from_the_global_one_resumes_from_its_checkpoint(two_stages, tiny_model, train_csv,
                                                                                 tmp_path, monkeypatch, caplog):
    """The question stage, stopped in its first fold and run again, ends as the uninterrupted stage did."""
    args = train_args(tiny_model, train_csv, tmp_path, "--questions", "31772", "--folds", "2", "--epochs", "2",
                      "--init-from", two_stages["output_dir"], recipe=config.DEFAULT_RECIPE)
    on_step_end = report.StepBar.on_step_end

    def stopping_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("stopped")
        return on_step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_at_step_3)
        assert run_train(args) == 1
    with caplog.at_level("INFO"):
        assert run_train(args) == 0
    assert "question 31772 fold 0: resuming from step 2 of 6" in caplog.text
    resumed, uninterrupted = results(str(tmp_path), 31772), results(two_stages["output_dir"], 31772)
    assert resumed["init_from_hash"] == uninterrupted["init_from_hash"]
    for key in ("best_map3", "final_map3", "initial_map3"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-9), key
    first, second = (pd.read_csv(os.path.join(folder, "question_31772", "oof_best.csv"), keep_default_na=False)
                     for folder in (str(tmp_path), two_stages["output_dir"]))
    pd.testing.assert_frame_equal(first, second, rtol=1e-5)


def test_decoding_never_ranks_another_questions_label():
    labels = ["False_Neither:NA", "True_Correct:NA", "True_Neither:NA", "True_Misconception:X"]
    probs = np.array([[0.5, 0.5, 0.0, 0.0]])
    allowed = np.array([[True, True, False, False]])
    assert decode_top_k(probs, labels, [True], True) == [["True_Correct:NA", "True_Neither:NA", "True_Misconception:X"]]
    assert decode_top_k(probs, labels, [True], True, fill_labels=["False_Neither:NA", "True_Other:NA"],
                        allowed=allowed) == [["True_Correct:NA", "False_Neither:NA", "True_Other:NA"]]


def test_with_one_split_a_question_without_a_model_of_its_own_is_scored_on_the_global_models_validation_rows(
        tiny_model, train_csv, tmp_path):
    args = train_args(tiny_model, train_csv, tmp_path, "--questions", f"33471,{SINGLE_CLASS_QUESTION}", "--epochs", "1",
                      recipe=config.DEFAULT_RECIPE)
    assert run_train(args) == 0
    entries = read_json(os.path.join(tmp_path, "summary", "sources.json"))["best"]["questions"]
    global_oof = pd.read_csv(tmp_path / "global" / "oof_best.csv", keep_default_na=False, dtype={"row_id": str})
    df = read_competition_csv(train_csv, labelled=True)
    validated = set(global_oof["row_id"]) & set(df.loc[df["QuestionId"] == SINGLE_CLASS_QUESTION, "row_id"])
    assert entries[str(SINGLE_CLASS_QUESTION)]["global_weight"] == 1.0
    assert entries[str(SINGLE_CLASS_QUESTION)]["rows"] == len(validated) > 0
    assert entries[str(SINGLE_CLASS_QUESTION)]["cross_fold_map3"] is None
