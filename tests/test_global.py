"""Learning across questions: the global model, per-question models started from it, blends, label spaces."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from peft import LoraConfig, TaskType

import config
import fine_tune
import report
import submit
import train
from conftest import SINGLE_CLASS_QUESTION, train_args
from data_collator import build_data_collator
from prompts import GLOBAL_PROMPT_VERSION, encode_prompts
from utils import (TORCH_DTYPES, attach_lora, attach_lora_from, blend_probabilities, correctness_of, label_probabilities,
                   label_suffix, load_base_model, load_tokenizer, predict_logits, read_json, read_question_results)

QUESTIONS = [31772, 33471, SINGLE_CLASS_QUESTION]


def read_csv(path):
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    df["QuestionId"] = df["QuestionId"].astype(int)
    return df


def read_oof(path):
    return pd.read_csv(path, keep_default_na=False, dtype={"row_id": str}).set_index("row_id")


@pytest.fixture(scope="module")
def both_scopes(tiny_model, train_csv, tmp_path_factory):
    """One output dir: a global model (suffix labels, 2 folds), then per-question models started from it."""
    output_dir = tmp_path_factory.mktemp("scopes")
    saved = config.snapshot()
    common = ["--questions", ",".join(map(str, QUESTIONS)), "--label-space", "suffix", "--folds", "2", "--epochs", "2"]
    global_code = train.main(train_args(tiny_model, train_csv, output_dir, *common, "--scope", "global"))
    config.update(saved)
    question_code = train.main(train_args(tiny_model, train_csv, output_dir, *common, "--init-from", str(output_dir)))
    config.update(saved)
    return {"output_dir": str(output_dir), "codes": (global_code, question_code)}


def results(output_dir, name):
    return read_json(os.path.join(output_dir, "summary", f"{name}_results.json" if name == config.GLOBAL
                                  else f"question_{name}_results.json"))


def test_both_scopes_train_into_one_output_dir(both_scopes):
    assert both_scopes["codes"] == (0, 0)
    result = results(both_scopes["output_dir"], config.GLOBAL)
    assert result["status"] == "succeeded" and result["prompt_version"] == GLOBAL_PROMPT_VERSION
    # The single-class question trains inside the global model, while alone it is skipped.
    assert set(result["question_classes"]) == {str(q) for q in QUESTIONS}
    assert results(both_scopes["output_dir"], SINGLE_CLASS_QUESTION)["status"] == "skipped"
    for fold in range(2):
        assert os.path.isfile(os.path.join(both_scopes["output_dir"], "global", f"fold_{fold}", "best", "adapter_config.json"))
    started = results(both_scopes["output_dir"], 31772)
    assert started["init_from"] == [os.path.join(both_scopes["output_dir"], "global", f"fold_{k}", "best") for k in range(2)]
    assert started["prompt_version"] == GLOBAL_PROMPT_VERSION  # the prompt its starting adapter learned


def test_out_of_fold_files_of_both_scopes_line_up(both_scopes):
    global_oof = read_oof(os.path.join(both_scopes["output_dir"], "global", "oof_best.csv"))
    for question_id in QUESTIONS[:2]:
        own = read_oof(os.path.join(both_scopes["output_dir"], f"question_{question_id}", "oof_best.csv"))
        assert global_oof.loc[own.index, "fold"].tolist() == own["fold"].tolist()
        assert set(own["fold"]) == {0, 1}


def test_a_mismatched_init_from_stops_before_any_question_is_retrained(both_scopes, tiny_model, train_csv, capsys):
    output_dir = both_scopes["output_dir"]
    before = {question_id: results(output_dir, question_id) for question_id in QUESTIONS}
    saved = config.snapshot()
    try:  # the global model was trained with --label-space suffix; this run asks for full labels
        code = train.main(train_args(tiny_model, train_csv, output_dir, "--questions", ",".join(map(str, QUESTIONS)),
                                     "--folds", "2", "--epochs", "2", "--init-from", output_dir))
    finally:
        config.update(saved)
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"error: --init-from {output_dir}: the global model has --label-space "
                                               "suffix, this run full (give --label-space suffix)")
    assert {question_id: results(output_dir, question_id) for question_id in QUESTIONS} == before


def test_validate_system_checks_init_from(both_scopes, tiny_model, train_csv, capsys):
    import validate_system
    output_dir = both_scopes["output_dir"]
    saved = config.snapshot()
    try:
        for label_space in ("suffix", "full"):
            validate_system.main(["--model", tiny_model, "--train-data", train_csv, "--output-dir", output_dir,
                                  "--folds", "2", "--label-space", label_space, "--init-from", output_dir])
            config.update(saved)
    finally:
        config.update(saved)
    lines = [line for line in capsys.readouterr().out.splitlines() if "init from" in line]
    global_result = results(output_dir, config.GLOBAL)
    assert lines == [f"✓ init from: {output_dir}: global model over 3 questions, 2 fold(s), suffix labels, prompt "
                     f"{GLOBAL_PROMPT_VERSION}, MAP@3 {global_result['final_map3']:.4f}",
                     f"✗ init from: --init-from {output_dir}: the global model has --label-space suffix, this run full "
                     "(give --label-space suffix)"]


def panel_titles(figure):
    return [axis.get_title() for axis in figure.axes if axis.get_title()]


def test_summary_pictures_show_the_global_model(both_scopes, tmp_path):
    """Its learning curve (the one to watch before choosing its --epochs) and its score on each question's rows."""
    global_result = results(both_scopes["output_dir"], config.GLOBAL)
    headline = f"global: final {global_result['final_map3']:.3f} (best {global_result['best_map3']:.3f})"
    per_question = {int(q): score for q, score in global_result["per_question_final_map3"].items()}
    assert set(per_question) == set(QUESTIONS)
    # A run with the global model alone: train.py's summary draws both pictures from it.
    alone = tmp_path / "alone"
    shutil.copytree(os.path.join(both_scopes["output_dir"], "global"), alone / "global")
    os.makedirs(alone / "summary")
    shutil.copy(os.path.join(both_scopes["output_dir"], "summary", "global_results.json"), alone / "summary")
    config.update({"OUTPUT_DIR": str(alone)})
    summary = train.write_summary(QUESTIONS)
    assert sorted(os.listdir(alone / "summary")) == ["all_questions_summary.json", "global_results.json",
                                                     "learning_curves.png", "map3_by_question.png"]
    curves = report.plot_learning_curves({}, str(tmp_path / "check.png"), global_result)
    assert panel_titles(curves) == [headline]
    folds = [line for line in curves.axes[0].get_lines() if line.get_linestyle() == "-" and line.get_marker() == "None"]
    assert len(folds) == 2 and all(len(line.get_xdata()) > 1 for line in folds)
    bars = report.plot_map3_by_question({}, summary, str(tmp_path / "check.png"), global_result)
    ordered = sorted(per_question, key=per_question.get)
    assert [label.get_text() for label in bars.axes[0].get_yticklabels()] == list(map(str, ordered))
    assert [patch.get_width() for patch in bars.axes[0].patches] == pytest.approx([per_question[q] for q in ordered])
    # With per-question models as well: the global panel first, and a mark at its score on each question's rows.
    config.update({"OUTPUT_DIR": both_scopes["output_dir"]})
    own = read_question_results(QUESTIONS)
    trained = sorted((q for q in QUESTIONS if own[q]["status"] == "succeeded"), key=lambda q: own[q]["final_map3"])
    curves = report.plot_learning_curves(own, str(tmp_path / "check.png"), global_result)
    assert panel_titles(curves)[0] == headline
    assert sorted(title.split(":")[0] for title in panel_titles(curves)[1:]) == sorted(map(str, trained))
    summary = read_json(os.path.join(both_scopes["output_dir"], "summary", "all_questions_summary.json"))
    bars = report.plot_map3_by_question(own, summary, str(tmp_path / "check.png"), global_result)
    marks = next(c for c in bars.axes[0].collections if c.get_label() == "global model on the question's rows")
    assert [x for x, _ in marks.get_offsets()] == pytest.approx([per_question[q] for q in trained])


def test_global_model_ranks_only_its_questions_labels(both_scopes, train_csv, tiny_model, test_csv, tmp_path):
    result = results(both_scopes["output_dir"], config.GLOBAL)
    question_of = dict(zip(*read_csv(train_csv)[["row_id", "QuestionId"]].T.values))
    oof = read_oof(os.path.join(both_scopes["output_dir"], "global", "oof_best.csv"))
    for row_id, row in oof.iterrows():  # validation: no probability outside the row's question's labels
        own = result["question_classes"][str(question_of[row_id])]
        outside = [label for label in oof.columns[2:] if label_suffix(label) not in own]
        assert row[outside].astype(float).sum() == 0.0
    assert len({str(question_of[row_id]) for row_id in oof.index}) == 3

    submission = tmp_path / "submission.csv"
    assert submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", both_scopes["output_dir"],
                        "--submission", str(submission), "--global-weight", "1", "--questions", "31772,33471,109465"]) == 0
    test = read_csv(test_csv)
    ranked = dict(pd.read_csv(submission, keep_default_na=False, dtype=str).values)
    checked = 0
    for row_id, question_id in zip(test["row_id"], test["QuestionId"]):
        if question_id in QUESTIONS:
            own = result["question_classes"][str(question_id)]
            is_own = [label_suffix(label) in own for label in ranked[row_id].split()]
            # The question's own labels come first, before any other (those only fill a top 3).
            assert is_own[0] and is_own == sorted(is_own, reverse=True)
            checked += 1
    assert checked >= 15


def test_init_from_predicts_what_the_global_model_predicts_before_any_step(both_scopes, tiny_model, test_csv):
    config.update({"OUTPUT_DIR": both_scopes["output_dir"], "MODEL_NAME": tiny_model, "FOLDS": 2, "LABEL_SPACE": "suffix",
                   "CHECKPOINT": "best"})
    question_id = 31772
    global_result = results(both_scopes["output_dir"], config.GLOBAL)
    classes = results(both_scopes["output_dir"], question_id)["classes"]
    rows = read_csv(test_csv)
    rows = rows[rows["QuestionId"] == question_id]
    tokenizer = load_tokenizer(tiny_model)
    predictor = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
    global_labels, global_probs = predictor.fold_probabilities(config.GLOBAL, rows, global_result)

    input_ids, _ = encode_prompts(rows, tokenizer, global_result["prompt_version"], 300)
    for fold in range(2):
        model = attach_lora_from(predictor.base_model, *train.global_start(both_scopes["output_dir"], question_id, classes, fold))
        logits = predict_logits(model, input_ids, build_data_collator(tokenizer), 8, "fp32")
        model.unload()
        labels, probs = label_probabilities(logits, classes, correctness_of(rows))
        columns = [global_labels.index(label) for label in labels]
        np.testing.assert_allclose(probs, global_probs[fold][:, columns], atol=1e-5)
    assert not np.allclose(global_probs[0], global_probs[1])  # each fold starts from its own global fold model


def test_the_global_pass_is_split_over_the_devices(both_scopes, tiny_model, test_csv, monkeypatch):
    config.update({"OUTPUT_DIR": both_scopes["output_dir"], "MODEL_NAME": tiny_model, "QUESTION_IDS": QUESTIONS,
                   "GLOBAL_WEIGHT": 0.3})
    test = read_csv(test_csv)
    global_rows = []
    probabilities = submit.Predictor.probabilities

    def noting_the_global_rows(self, question_id, rows, result):
        if question_id == config.GLOBAL:
            global_rows.append((self, len(rows)))
        return probabilities(self, question_id, rows, result)

    monkeypatch.setattr(submit.Predictor, "probabilities", noting_the_global_rows)
    one = submit.predict(test, ["cpu"])[0]
    (_, rows), = global_rows
    global_rows.clear()
    assert submit.predict(test, ["cpu", "cpu"])[0] == one
    assert len({id(predictor) for predictor, _ in global_rows}) == 2
    assert sorted(share for _, share in global_rows) == [rows // 2, rows - rows // 2]


def test_blend_is_the_weighted_mean_of_its_parts(both_scopes, tiny_model, test_csv):
    # The final checkpoints: a best_map3 checkpoint may be the starting point itself, the global model.
    config.update({"OUTPUT_DIR": both_scopes["output_dir"], "MODEL_NAME": tiny_model, "QUESTION_IDS": QUESTIONS,
                   "GLOBAL_WEIGHT": 0.3, "CHECKPOINT": "best"})
    test = read_csv(test_csv)
    rows = test[test["QuestionId"] == 33471]
    tokenizer = load_tokenizer(tiny_model)
    predictor = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
    question_result = results(both_scopes["output_dir"], 33471)
    own_labels, own, _ = predictor.probabilities(33471, rows, question_result)
    global_part = submit.global_probabilities([predictor], test)[33471]
    labels, blended = blend_probabilities([(0.7, own_labels, own), (0.3, *global_part[:2])])
    for label in labels:
        expected = (0.7 * own[:, own_labels.index(label)] if label in own_labels else 0) + (
            0.3 * global_part[1][:, global_part[0].index(label)] if label in global_part[0] else 0)
        np.testing.assert_allclose(blended[:, labels.index(label)], expected, atol=1e-12)
    assert not np.allclose(own, global_part[1][:, [global_part[0].index(label) for label in own_labels]], atol=1e-3)
    ranked, how, fallback = submit.predict_group(predictor, 33471, rows, {33471: question_result}, global_part)
    assert how == "model (2 folds) + global model (2 folds), global weight 0.3" and fallback is None
    top = np.argsort(-(blended + 2.0 * np.array([[label.startswith("True_") == verdict for label in labels]
                                                  for verdict in correctness_of(rows)])), axis=1, kind="stable")[:, :3]
    assert ranked == [[labels[i] for i in row] for row in top]


def test_at_global_weight_0_the_global_model_predicts_only_questions_without_a_usable_model(
        both_scopes, tiny_model, test_csv, tmp_path, monkeypatch):
    predicted = []  # (model, questions of the rows it was given)
    probabilities = submit.Predictor.probabilities

    def recorded(self, question_id, rows, result):
        predicted.append((question_id, set(rows["QuestionId"])))
        return probabilities(self, question_id, rows, result)

    monkeypatch.setattr(submit.Predictor, "probabilities", recorded)
    argv = ["--model", tiny_model, "--test-data", test_csv, "--output-dir", both_scopes["output_dir"],
            "--questions", ",".join(map(str, QUESTIONS))]

    def global_runs(*extra):
        predicted.clear()
        path = tmp_path / f"submission{len(list(tmp_path.iterdir()))}.csv"
        assert submit.main(argv + ["--submission", str(path), *extra]) == 0
        written = pd.read_csv(path, keep_default_na=False, dtype=str).set_index("row_id")
        return [questions for model, questions in predicted if model == config.GLOBAL], written

    runs, _ = global_runs("--global-weight", "0")
    assert runs == [{SINGLE_CLASS_QUESTION}]  # the one question without a model of its own
    _, global_only = global_runs("--global-weight", "1")
    load_adapter = submit.load_adapter

    def broken_for_33471(base_model, path, num_labels):
        if "question_33471" in path:
            raise OSError(f"{path}: unreadable")
        return load_adapter(base_model, path, num_labels)

    monkeypatch.setattr(submit, "load_adapter", broken_for_33471)
    runs, written = global_runs("--global-weight", "0")
    assert runs == [{SINGLE_CLASS_QUESTION}, {33471}]
    rows = read_csv(test_csv).query("QuestionId == 33471")["row_id"]
    assert written.loc[rows].equals(global_only.loc[rows])


def test_suffix_labels_take_their_prefix_from_the_answers_correctness():
    classes = ["Correct:NA", "Misconception:WNB", "Neither:NA"]
    logits = np.log([[0.6, 0.3, 0.1]] * 3)
    labels, probs = label_probabilities(logits, classes, [True, False, None])
    row = {label: list(p) for label, p in zip(labels, probs.T)}
    assert row["True_Correct:NA"] == pytest.approx([0.6, 0.0, 0.3])
    assert row["False_Correct:NA"] == pytest.approx([0.0, 0.6, 0.3])
    assert row["True_Misconception:WNB"] == pytest.approx([0.3, 0.0, 0.15])
    assert probs.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0])
    # A restriction to the row's question's labels renormalises over them.
    _, restricted = label_probabilities(logits, classes, [True] * 3, np.array([[True, False, True]] * 3))
    assert restricted[0, labels.index("True_Correct:NA")] == pytest.approx(0.6 / 0.7)
    # Full labels pass through unchanged.
    full = ["False_Neither:NA", "True_Correct:NA"]
    assert label_probabilities(np.zeros((1, 2)), full, [None])[0] == full


def test_a_new_head_starts_at_the_label_prior_and_learns_faster(tiny_model):
    labels = np.array([0, 0, 0, 1, 2, 2])
    prior = fine_tune.log_prior(labels, 4)
    np.testing.assert_allclose(np.exp(prior), np.array([4, 2, 3, 1]) / 10, rtol=1e-6)
    tokenizer = load_tokenizer(tiny_model)
    base = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = attach_lora(base, lora, 4, head_bias=prior)
    try:
        head = model.base_model.model.score.modules_to_save["default"]
        np.testing.assert_allclose(head.bias.detach().numpy(), prior)
        config.update({"LEARNING_RATE": 1e-3, "HEAD_LR_MULTIPLIER": 10.0})
        optimizer = fine_tune.build_optimizer(model, config.HEAD_LR_MULTIPLIER)
        rest, head_group = optimizer.param_groups
        assert head_group["lr"] == pytest.approx(1e-2) and rest["lr"] == pytest.approx(1e-3)
        assert {id(p) for p in head_group["params"]} == {id(head.weight), id(head.bias)}
        assert all("lora_" in name for name, p in model.named_parameters() if any(p is q for q in rest["params"]))
    finally:
        model.unload()
