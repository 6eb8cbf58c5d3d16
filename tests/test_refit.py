"""--refit: after the K folds, each model trained once more on all its rows for the epochs the folds chose; submit.py
--predict-with folds, refit or both."""
import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

import config
import fine_tune
import report
import submit
import train
from conftest import SINGLE_CLASS_QUESTION, STAGE_FLAGS, STAGE_QUESTIONS, file_hash, run_train, train_args
from data_collator import build_data_collator
from prompts import encode_prompts
from utils import (TORCH_DTYPES, correctness_of, label_probabilities, load_adapter, load_base_model, load_tokenizer,
                   predict_logits, read_competition_csv, read_json, training_targets)

MODELS = [config.GLOBAL, *STAGE_QUESTIONS[:2]]
QUESTION = 33471


def results(output_dir, name):
    return read_json(os.path.join(output_dir, "summary", "global_results.json" if name == config.GLOBAL
                                  else f"question_{name}_results.json"))


def model_dir(output_dir, name):
    return os.path.join(output_dir, name if name == config.GLOBAL else f"question_{name}")


def fold_adapters(output_dir):
    """{adapter file: sha1} of every fold adapter of the run."""
    paths = [os.path.join(model_dir(output_dir, name), f"fold_{fold}", checkpoint, "adapter_model.safetensors")
             for name in MODELS for fold in range(2) for checkpoint in ("best", "best_map3")]
    return {path: hashlib.sha1(open(path, "rb").read()).hexdigest() for path in paths}


@pytest.fixture(scope="module")
def refit_run(two_stages, tiny_model, train_csv, tmp_path_factory):
    """A copy of the default recipe's two stages with 2 folds, then the same command with --refit added."""
    output_dir = str(tmp_path_factory.mktemp("refit") / "run")
    shutil.copytree(two_stages["output_dir"], output_dir)
    args = train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, recipe=config.DEFAULT_RECIPE)
    before = {"results": {name: results(output_dir, name) for name in MODELS}, "adapters": fold_adapters(output_dir)}
    trained = []
    train_fold = train.train_fold

    def recording(question_id, fold, *rest, **kwargs):
        trained.append((question_id, fold))
        return train_fold(question_id, fold, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_fold", recording)
        code = run_train(args + ["--refit"])
    return {"output_dir": output_dir, "args": args + ["--refit"], "code": code, "before": before, "trained": trained}


def test_adding_refit_to_a_complete_run_trains_only_the_refit_models(refit_run):
    assert refit_run["code"] == 0
    assert refit_run["trained"] == [(name, config.REFIT_MODEL) for name in MODELS]
    assert fold_adapters(refit_run["output_dir"]) == refit_run["before"]["adapters"]
    for name in MODELS:
        after = results(refit_run["output_dir"], name)
        assert after["refit"]["status"] == "succeeded"
        # The results change by their refit record alone: the question models keep their start's hash.
        assert {key: value for key, value in after.items() if key != "refit"} == refit_run["before"]["results"][name]
    assert "refit" not in results(refit_run["output_dir"], SINGLE_CLASS_QUESTION)


def test_a_refit_model_trains_on_every_trainable_row_for_the_steps_the_folds_chose(refit_run, train_csv):
    output_dir = refit_run["output_dir"]
    df = read_competition_csv(train_csv, labelled=True)
    config.update({"QUESTION_IDS": STAGE_QUESTIONS})
    for name in MODELS:
        result = results(output_dir, name)
        rows = train.model_rows(df, name)
        labels = np.searchsorted(result["classes"], training_targets(rows, result["label_space"]))
        trainable = train.resolve_duplicates(train.text_groups(rows), labels, result["training_settings"]["DUPLICATES"])[1]
        refit = result["refit"]
        assert refit["train_rows"] == trainable.sum() == len(rows)
        epochs = result["training_settings"]["EPOCHS"] * np.mean([fold["best_step"] / fold["steps"]
                                                                   for fold in result["fold_results"]])
        assert refit["epochs"] == pytest.approx(epochs)
        steps_per_epoch = math.ceil(len(rows) / result["training_settings"]["TRAIN_BATCH_SIZE"])
        assert refit["steps"] == math.ceil(epochs * steps_per_epoch) > 0
        history = read_json(os.path.join(model_dir(output_dir, name), "logs", "log_history_refit.json"))
        assert history[-1]["step"] == refit["steps"] and not any("eval_map3" in entry for entry in history)
        # best/ alone: no validation, no best_map3/; no checkpoint left behind.
        refit_dir = os.path.join(model_dir(output_dir, name), config.REFIT_MODEL)
        assert sorted(os.listdir(refit_dir)) == ["best"]
        weights = load_file(os.path.join(refit_dir, "best", "adapter_model.safetensors"))
        for fold in range(2):
            for checkpoint in ("best", "best_map3"):
                other = load_file(os.path.join(model_dir(output_dir, name), f"fold_{fold}", checkpoint,
                                               "adapter_model.safetensors"))
                assert set(other) == set(weights)
                assert any(not np.allclose(weights[key].numpy(), other[key].numpy()) for key in weights)


def test_a_question_refit_model_starts_from_the_global_refit_model(refit_run):
    output_dir = refit_run["output_dir"]
    global_results = os.path.join(output_dir, "summary", "global_results.json")
    result = results(output_dir, QUESTION)
    assert result["refit"]["init_from"] == os.path.join(output_dir, config.GLOBAL, config.REFIT_MODEL, "best")
    assert result["refit"]["init_from_hash"] == file_hash(global_results)
    # Its folds started from the global folds, whose hash leaves the refit record out.
    assert result["init_from_hash"] != file_hash(global_results)
    summary = read_json(os.path.join(output_dir, "summary", "all_questions_summary.json"))
    assert summary["global"]["refit"]["status"] == summary["per_question"]["33471"]["refit"]["status"] == "succeeded"
    assert "refit models (--refit" in report.training_table(summary)


def test_a_rerun_with_refit_trains_nothing(refit_run, monkeypatch):
    before = {name: results(refit_run["output_dir"], name) for name in MODELS}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(train, "train_fold", no_training)
    assert run_train(refit_run["args"]) == 0
    assert {name: results(refit_run["output_dir"], name) for name in MODELS} == before


def member_probabilities(tiny_model, output_dir, question_id, rows, result):
    """{member: probabilities} of each of a question's adapters, loaded one by one."""
    tokenizer = load_tokenizer(tiny_model)
    input_ids, _ = encode_prompts(rows, tokenizer, result["prompt_version"], result["max_len"])
    base = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
    probs = {}
    for member, checkpoint in ((0, "best_map3"), (1, "best_map3"), (config.REFIT_MODEL, "best")):
        path = os.path.join(model_dir(output_dir, question_id), config.member_name(member), checkpoint)
        model = load_adapter(base, path, len(result["classes"]))
        logits = predict_logits(model, input_ids, build_data_collator(tokenizer), 8, "fp32")
        model.unload()
        probs[member] = label_probabilities(logits, result["classes"], correctness_of(rows), None)[1]
    return probs


def test_predict_with_folds_refit_or_both(refit_run, tiny_model, test_csv, caplog):
    output_dir = refit_run["output_dir"]
    config.update({"OUTPUT_DIR": output_dir, "MODEL_NAME": tiny_model})
    test = read_competition_csv(test_csv, labelled=False)
    rows = test[test["QuestionId"] == QUESTION]
    result = results(output_dir, QUESTION)
    expected = member_probabilities(tiny_model, output_dir, QUESTION, rows, result)
    folds = (expected[0] + expected[1]) / 2
    assert not np.allclose(folds, expected[config.REFIT_MODEL], atol=1e-4)
    tokenizer = load_tokenizer(tiny_model)
    predictor = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
    for predict_with, probs, used, how in (("folds", folds, (2, False), "model (2 folds)"),
                                           ("refit", expected[config.REFIT_MODEL], (0, True), "model (refit)"),
                                           ("both", (folds + expected[config.REFIT_MODEL]) / 2, (2, True),
                                            "model (2 folds + refit)")):
        config.update({"PREDICT_WITH": predict_with})
        _, predicted, models = predictor.probabilities(QUESTION, rows, result)
        np.testing.assert_allclose(predicted, probs, atol=1e-6)
        assert models == used and submit.models_used("model", models, 2) == how
    # A run without refit models predicts with its folds; an unusable refit model leaves the folds, with a warning.
    config.update({"PREDICT_WITH": "refit"})
    without = {key: value for key, value in result.items() if key != "refit"}
    np.testing.assert_allclose(predictor.probabilities(QUESTION, rows, without)[1], folds, atol=1e-6)
    refit_dir = os.path.join(model_dir(output_dir, QUESTION), config.REFIT_MODEL)
    os.rename(refit_dir, refit_dir + ".away")
    try:
        _, predicted, models = predictor.probabilities(QUESTION, rows, result)
    finally:
        os.rename(refit_dir + ".away", refit_dir)
    np.testing.assert_allclose(predicted, folds, atol=1e-6)
    assert models == (2, False) and f"skipping {os.path.join(refit_dir, 'best')}" in caplog.text


def test_submit_table_names_the_refit_model(refit_run, tiny_model, test_csv, tmp_path, capsys):
    assert submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", refit_run["output_dir"],
                        "--submission", str(tmp_path / "submission.csv"), "--questions", ",".join(map(str, STAGE_QUESTIONS)),
                        "--predict-with", "both", "--global-weight", "0.5"]) == 0
    table = capsys.readouterr().out
    line = next(line for line in table.splitlines() if line.split()[:1] == [str(QUESTION)])
    assert "model (2 folds + refit) + global model (2 folds + refit), global weight 0.5" in line


def test_refit_needs_folds(tiny_model, train_csv, tmp_path, capsys):
    assert run_train(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471", "--refit")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --refit trains on all rows for the epochs the folds chose: it needs --folds K > 1")
    assert not os.path.exists(tmp_path / "question_33471")


def test_refit_from_a_global_model_without_one_is_refused(refit_run, tiny_model, train_csv, tmp_path, capsys):
    output_dir = tmp_path / "no_global_refit"
    shutil.copytree(refit_run["output_dir"], output_dir)
    path = output_dir / "summary" / "global_results.json"
    path.write_text(json.dumps({key: value for key, value in json.loads(path.read_text()).items() if key != "refit"}))
    before = results(str(output_dir), QUESTION)
    capsys.readouterr()
    assert run_train(train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, "--refit", "--label-space", "suffix",
                                "--init-from", str(output_dir))) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --init-from {output_dir}: the global model has no refit model, which --refit starts the questions' "
        "refit models from (train it with --refit)")
    assert results(str(output_dir), QUESTION) == before


def test_a_stopped_refit_model_resumes_from_its_checkpoint(refit_run, tiny_model, train_csv, tmp_path, monkeypatch, caplog):
    """Its checkpoints hold no best_map3: resumed, it ends as the uninterrupted refit model did."""
    output_dir = tmp_path / "resumed"
    shutil.copytree(refit_run["output_dir"], output_dir)
    path = output_dir / "summary" / "question_33471_results.json"
    path.write_text(json.dumps({key: value for key, value in json.loads(path.read_text()).items() if key != "refit"}))
    shutil.rmtree(output_dir / "question_33471" / config.REFIT_MODEL)
    args = train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, "--refit", recipe=config.DEFAULT_RECIPE)
    on_step_end = report.StepBar.on_step_end

    def stopping_after_a_checkpoint(self, args, state, control, **kwargs):
        if fine_tune.complete_checkpoints(args.output_dir):
            raise RuntimeError("stopped")
        return on_step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_after_a_checkpoint)
        assert run_train(args) == 1
    assert results(str(output_dir), 33471)["refit"]["error"] == "RuntimeError: stopped"
    with caplog.at_level("INFO"):
        assert run_train(args) == 0
    assert "question 33471 refit: resuming from step " in caplog.text
    resumed, uninterrupted = (load_file(os.path.join(folder, "question_33471", config.REFIT_MODEL, "best",
                                                     "adapter_model.safetensors"))
                              for folder in (str(output_dir), refit_run["output_dir"]))
    for key in uninterrupted:
        np.testing.assert_allclose(resumed[key].numpy(), uninterrupted[key].numpy(), atol=1e-6)


def refit_logits(tiny_model, output_dir, name, rows, result):
    tokenizer = load_tokenizer(tiny_model)
    input_ids, _ = encode_prompts(rows, tokenizer, result["prompt_version"], result["max_len"])
    base = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
    model = load_adapter(base, os.path.join(model_dir(output_dir, name), config.REFIT_MODEL, "best"), len(result["classes"]))
    try:
        return predict_logits(model, input_ids, build_data_collator(tokenizer), 8, "fp32")
    finally:
        model.unload()


def test_a_refit_whose_folds_peaked_at_step_0_is_its_start(refit_run, tiny_model, train_csv, tmp_path):
    """Folds whose best evaluation was their first chose 0 epochs: the refit model trains 0 steps and predicts as
    the global refit model it starts from, over the question's labels."""
    output_dir = tmp_path / "step_0"
    shutil.copytree(refit_run["output_dir"], output_dir)
    path = output_dir / "summary" / "question_33471_results.json"
    result = {key: value for key, value in json.loads(path.read_text()).items() if key != "refit"}
    result["fold_results"] = [{**fold, "best_step": 0} for fold in result["fold_results"]]
    path.write_text(json.dumps(result))
    shutil.rmtree(output_dir / "question_33471" / config.REFIT_MODEL)
    assert run_train(train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, "--refit",
                                recipe=config.DEFAULT_RECIPE)) == 0
    refit = results(str(output_dir), QUESTION)["refit"]
    assert (refit["status"], refit["epochs"], refit["steps"]) == ("succeeded", 0.0, 0)
    rows = read_competition_csv(train_csv, labelled=True)
    rows = rows[rows["QuestionId"] == QUESTION]
    global_result = results(str(output_dir), config.GLOBAL)
    columns = [global_result["classes"].index(label) for label in result["classes"]]
    np.testing.assert_allclose(refit_logits(tiny_model, str(output_dir), QUESTION, rows, result),
                               refit_logits(tiny_model, str(output_dir), config.GLOBAL, rows, global_result)[:, columns],
                               atol=1e-5)


def test_a_model_retrained_without_refit_leaves_no_refit_model_of_earlier_inputs(refit_run, tiny_model, train_csv, tmp_path,
                                                                                caplog):
    """Question 33471 retrained with other epochs and no --refit: its refit adapter, of the earlier model, goes;
    the other models' stay."""
    output_dir = tmp_path / "retrained"
    shutil.copytree(refit_run["output_dir"], output_dir)
    stale = output_dir / "question_33471" / config.REFIT_MODEL / "best"
    with caplog.at_level("INFO"):
        assert run_train(train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, "--scope", "question",
                                    "--questions", "33471", "--epochs", "1", recipe=config.DEFAULT_RECIPE)) == 0
    assert "refit" not in results(str(output_dir), QUESTION)
    assert not stale.exists() and f"question 33471: removing {stale}, the refit model of earlier inputs" in caplog.text
    assert (output_dir / config.GLOBAL / config.REFIT_MODEL / "best" / "adapter_model.safetensors").is_file()
