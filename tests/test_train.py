"""Per-question training end to end on the tiny Qwen3 and synthetic data."""
import json
import os

import numpy as np
import pandas as pd
import pytest

import config
import fine_tune
import train
from conftest import SINGLE_CLASS_QUESTION, SINGLETON, train_args
from prompt_utils import questions
from utils import (TORCH_DTYPES, adaptable_layers, correctness_of, decode_top_k, load_adapter, load_base_model, load_tokenizer,
                   map_at_k, predict_logits, read_competition_csv, unmatched_lora_targets)
from data_collator import build_data_collator


def results(output_dir, question_id):
    with open(os.path.join(output_dir, "summary", f"question_{question_id}_results.json")) as handle:
        return json.load(handle)


def test_every_trained_question_has_its_artifacts(trained):
    assert trained["code"] == 0
    for question_id in questions:
        question_dir = os.path.join(trained["output_dir"], f"question_{question_id}")
        assert os.path.isfile(os.path.join(question_dir, "label_encoder.joblib"))
        if question_id == SINGLE_CLASS_QUESTION:
            continue
        for checkpoint in ("best", "best_map3"):
            assert os.path.isfile(os.path.join(question_dir, checkpoint, "adapter_model.safetensors"))
        assert os.path.isfile(os.path.join(question_dir, "logs", "train.log"))
        history = json.load(open(os.path.join(question_dir, "logs", "log_history.json")))
        assert any("eval_map3" in entry for entry in history)
        result = results(trained["output_dir"], question_id)
        assert result["status"] == "succeeded"
        assert result["train_rows"] + result["val_rows"] == result["rows"] and result["nonfinite_steps"] == 0
        assert 0 <= result["final_map3"] <= result["best_map3"] <= 1
        assert result["seconds"] > 0 and result["peak_rss_mb"] > 0


def test_skipped_question_and_summary(trained):
    skipped = results(trained["output_dir"], SINGLE_CLASS_QUESTION)
    assert skipped["status"] == "skipped" and skipped["classes"] == ["True_Correct:NA"]
    assert skipped["reason"] == f"Warning: Question {SINGLE_CLASS_QUESTION} has only 1 class(es). Skipping..."
    summary = json.load(open(os.path.join(trained["output_dir"], "summary", "all_questions_summary.json")))
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (14, 0, 1)
    per_question = [results(trained["output_dir"], q) for q in questions if q != SINGLE_CLASS_QUESTION]
    weighted = sum(r["best_map3"] * r["val_rows"] for r in per_question) / sum(r["val_rows"] for r in per_question)
    assert summary["overall_best_map3"] == pytest.approx(weighted)
    assert summary["per_question"][str(SINGLE_CLASS_QUESTION)]["status"] == "skipped"


def test_skip_warning_is_printed(tiny_model, train_csv, tmp_path, capsys):
    code = train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", str(SINGLE_CLASS_QUESTION)))
    assert code == 0
    assert f"Warning: Question {SINGLE_CLASS_QUESTION} has only 1 class(es). Skipping..." in capsys.readouterr().out


def test_validation_map3_beats_the_label_prior(trained, train_csv):
    """The prior predicts each question's training label frequencies (with the same correctness mask, ties in label
    order); train.py records its score per question."""
    df = read_competition_csv(train_csv, labelled=True)
    model_scores, prior_scores, weights = [], [], []
    for question_id in questions:
        if question_id == SINGLE_CLASS_QUESTION:
            continue
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        train_idx, val_idx = train.fold_splits(rows, 1, config.SEED)[0]
        counts = rows.loc[train_idx, "Category:Misconception"].value_counts().sort_index().sort_values(ascending=False, kind="stable")
        val = rows.loc[val_idx]
        frequencies = counts.to_numpy(float) / counts.sum()  # probabilities: the mask's bonus must outweigh them
        prior = decode_top_k(np.tile(frequencies, (len(val), 1)), counts.index, correctness_of(val), True)
        prior_scores.append(map_at_k(val["Category:Misconception"].tolist(), prior))
        model_scores.append(results(trained["output_dir"], question_id)["best_map3"])
        assert results(trained["output_dir"], question_id)["prior_map3"] == pytest.approx(prior_scores[-1]), question_id
        weights.append(len(val))
    model, prior = np.average(model_scores, weights=weights), np.average(prior_scores, weights=weights)
    assert model > prior + 0.1, (model, prior)


def test_split_keeps_singleton_classes_in_training_and_duplicates_together(train_csv):
    df = read_competition_csv(train_csv, labelled=True)
    rows = df[df["QuestionId"] == SINGLETON[0]].reset_index(drop=True)
    rows = pd.concat([rows, rows.iloc[:20]], ignore_index=True)  # 20 repeated texts
    train_idx, val_idx = train.fold_splits(rows, 1, 0)[0]
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(len(rows)))
    singleton = rows.index[rows["Category:Misconception"] == SINGLETON[1]]
    assert set(singleton) <= set(train_idx)
    key = rows["MC_Answer"] + rows["StudentExplanation"]
    assert not set(key[train_idx]) & set(key[val_idx])
    assert 0.1 < len(val_idx) / len(rows) < 0.3


def test_saved_adapter_reloaded_on_a_fresh_base_gives_the_same_logits(tiny_model, train_csv, tmp_path, monkeypatch):
    captured = {}
    save = fine_tune.save_adapter
    tokenizer = load_tokenizer(tiny_model)
    probe = [tokenizer("Answer: 3 (incorrect)\nExplanation: mistake wnb")["input_ids"], tokenizer("hello")["input_ids"]]
    collator = build_data_collator(tokenizer)

    def save_and_capture(model, path):
        save(model, path)
        captured[os.path.basename(path)] = predict_logits(model, probe, collator, 2, "fp32")

    monkeypatch.setattr(fine_tune, "save_adapter", save_and_capture)
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471")) == 0
    fresh = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
    classes = results(str(tmp_path), 33471)["classes"]
    model = load_adapter(fresh, os.path.join(tmp_path, "question_33471", "best"), len(classes))
    reloaded = predict_logits(model, probe, collator, 2, "fp32")
    np.testing.assert_allclose(reloaded, captured["best"], atol=1e-5)
    assert not np.allclose(reloaded, 0)


def test_resume_skips_completed_questions_and_overwrite_retrains(tiny_model, train_csv, tmp_path, monkeypatch):
    args = train_args(tiny_model, train_csv, tmp_path, "--questions", "33471,104665")
    assert train.main(args) == 0
    first = results(str(tmp_path), 33471)
    calls = []
    original = train.train_question
    monkeypatch.setattr(train, "train_question", lambda qid, *a: calls.append(qid) or original(qid, *a))
    assert train.main(args) == 0
    assert calls == [] and results(str(tmp_path), 33471) == first
    os.remove(os.path.join(tmp_path, "question_104665", "best_map3", "adapter_model.safetensors"))
    os.remove(os.path.join(tmp_path, "question_104665", "best_map3", "adapter_config.json"))
    assert train.main(args) == 0
    assert calls == [104665]
    assert train.main(args + ["--overwrite"]) == 0
    assert calls == [104665, 33471, 104665]


def test_one_failing_question_does_not_stop_the_others(tiny_model, train_csv, tmp_path, monkeypatch):
    original = train.train_question

    def flaky(question_id, *args):
        if question_id == 33471:
            raise RuntimeError("simulated CUDA error")
        return original(question_id, *args)

    monkeypatch.setattr(train, "train_question", flaky)
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471,104665")) == 1
    failed = results(str(tmp_path), 33471)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: simulated CUDA error"
    assert results(str(tmp_path), 104665)["status"] == "succeeded"
    summary = json.load(open(os.path.join(tmp_path, "summary", "all_questions_summary.json")))
    assert (summary["succeeded"], summary["failed"]) == (1, 1)


def test_question_absent_from_the_data_is_a_clear_error(tiny_model, train_csv, tmp_path, capsys):
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "12345")) == 2
    assert capsys.readouterr().err.strip() == f"error: {train_csv}: no rows for QuestionId 12345"


def test_lora_targets_not_in_the_model_stop_before_any_question_is_retrained(tiny_model, train_csv, tmp_path, capsys):
    """peft would adapt q_proj alone (a typo quietly trains fewer layers), and fail every question on no match."""
    args = train_args(tiny_model, train_csv, tmp_path, "--questions", "104665")
    assert train.main(args) == 0
    before = results(str(tmp_path), 104665)
    capsys.readouterr()
    assert train.main(args + ["--overwrite", "--lora-targets", "q_proj,vproj"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --lora-targets: vproj not in {tiny_model} (its linear layers: "
                                               "down_proj, gate_proj, k_proj, o_proj, q_proj, score, up_proj, v_proj)")
    assert results(str(tmp_path), 104665) == before


def test_lora_targets_match_as_peft_matches_them(tiny_model):
    layers = adaptable_layers(tiny_model)
    assert unmatched_lora_targets(layers, ["self_attn.q_proj", "v_proj", "embed_tokens", "mlp", "q"]) == ["mlp", "q"]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--train-data", "--output-dir", "--questions", "--epochs", "--max-len", "--prompt-version",
                 "--lora-targets", "--batch-size", "--lr", "--overwrite", "--wandb"):
        assert flag in help_text


def test_flags_override_the_config(tmp_path):
    config.parse_args("x", "train", ["--questions", "1,2", "--lora-targets", "query,value", "--lr", "0.5", "--wandb"])
    assert config.QUESTION_IDS == [1, 2] and config.LORA_TARGET_MODULES == ["query", "value"]
    assert config.LEARNING_RATE == 0.5 and config.USE_WANDB is True
    assert config.get_question_model_path(7) == os.path.join(config.OUTPUT_DIR, "question_7", "best_map3")


def test_demo_keeps_settings_given_on_the_command_line(tmp_path, monkeypatch):
    from demo import synthetic
    monkeypatch.setattr(synthetic, "build_tiny_qwen3", lambda path: path)
    config.parse_args("x", "train", ["--demo", "--epochs", "3", "--demo-output-dir", str(tmp_path)])
    assert config.GIVEN == {"DEMO", "EPOCHS", "DEMO_OUTPUT_DIR"}
    synthetic.prepare_demo(rows_per_question=5)
    assert config.EPOCHS == 3
    assert config.LEARNING_RATE == config.DEMO_SETTINGS["LEARNING_RATE"]
    assert config.OUTPUT_DIR == str(tmp_path) and os.path.isfile(config.TRAIN_DATA_PATH)


def test_demo_refuses_an_output_dir_it_would_ignore(tmp_path, capsys):
    code = train.main(["--demo", "--demo-output-dir", str(tmp_path / "demo"), "--output-dir", str(tmp_path / "mine")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --demo makes its own model") and error.endswith("drop --output-dir")
    assert "\n" not in error and not (tmp_path / "demo").exists() and not (tmp_path / "mine").exists()


def test_a_step_with_non_finite_gradients_fails_the_model_and_says_so(tiny_model, train_csv, tmp_path, monkeypatch):
    """In fp32 one such step writes NaN into the weights, and the Trainer's log would show the running loss."""
    loss = fine_tune.training_loss
    calls = []

    def exploding_at_step_5(weights, rows_per_step):
        compute = loss(weights, rows_per_step)

        def exploding(outputs, labels, num_items_in_batch=None):
            calls.append(1)
            return compute(outputs, labels) * (float("inf") if len(calls) == 5 else 1.0)
        return exploding

    monkeypatch.setattr(fine_tune, "training_loss", exploding_at_step_5)
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471")) == 1
    result = results(str(tmp_path), 33471)
    assert result["status"] == "failed"
    assert "NonFiniteTraining: 1 optimizer step(s) with non-finite gradients by step 5 (allowed in fp32: 0)" in result["error"]
    assert len(calls) == 5  # training stopped there
    assert not os.path.exists(tmp_path / "question_33471" / "trainer")
    # fp16's gradient scaler skips steps while it finds its scale: those are allowed.
    assert fine_tune.nonfinite_allowance("fp16", 3000) == 19 and fine_tune.nonfinite_allowance("bf16", 3000) == 0


def test_label_smoothing_raises_the_training_loss(tiny_model, train_csv, tmp_path):
    losses = {}
    for smoothing in ("0", "0.5"):
        output_dir = tmp_path / smoothing
        assert train.main(train_args(tiny_model, train_csv, output_dir, "--questions", "33471", "--label-smoothing", smoothing)) == 0
        history = json.load(open(output_dir / "question_33471" / "logs" / "log_history.json"))
        losses[smoothing] = next(entry["train_loss"] for entry in history if "train_loss" in entry)
    assert losses["0.5"] > losses["0"] + 0.1, losses


def test_duplicate_policies_resolve_conflicting_texts():
    groups = np.array(["a", "a", "a", "b", "b", "c", "c", "d"])
    labels = np.array([0, 0, 1, 2, 3, 1, 1, 2])
    kept_labels, kept = train.resolve_duplicates(groups, labels, "keep")
    assert kept.all() and (kept_labels == labels).all()
    dropped_labels, kept = train.resolve_duplicates(groups, labels, "drop")
    assert kept.tolist() == [False, False, False, False, False, True, True, True] and (dropped_labels == labels).all()
    majority_labels, kept = train.resolve_duplicates(groups, labels, "majority")
    # "a" takes its majority label 0; "b" is a 1-1 tie and is dropped; agreeing groups are untouched.
    assert majority_labels.tolist() == [0, 0, 0, 2, 3, 1, 1, 2]
    assert kept.tolist() == [True, True, True, False, False, True, True, True]
    assert labels.tolist() == [0, 0, 1, 2, 3, 1, 1, 2]


def test_class_weights_balance_the_classes_and_average_one():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    assert fine_tune.class_weights(labels, 4, 0.0).tolist() == [1.0] * 4
    weights = fine_tune.class_weights(labels, 4, 1.0).numpy()
    per_class_total = weights[:3] * np.bincount(labels)
    assert np.allclose(per_class_total, per_class_total[0])
    assert weights[labels].mean() == pytest.approx(1.0)
    sqrt = fine_tune.class_weights(labels, 4, 0.5).numpy()
    assert sqrt[2] / sqrt[0] == pytest.approx(6 ** 0.5, rel=1e-5)


def test_training_loss_matches_cross_entropy():
    import torch
    import torch.nn.functional as F
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 2, 0])
    unweighted = fine_tune.training_loss(torch.ones(3), 5)
    assert unweighted({"logits": logits}, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # Divided by the nominal rows per step, not by the batch's own size: two batches of 2 and 3 rows (sizes vary
    # with LengthGroupedBatches) sum to the mean over all 5, so every row weighs the same.
    parts = unweighted({"logits": logits[:2]}, labels[:2], 2) + unweighted({"logits": logits[2:]}, labels[2:], 3)
    assert parts.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    weights = torch.tensor([2.0, 1.0, 0.5])
    expected = (F.cross_entropy(logits, labels, reduction="none") * weights[labels]).mean()
    assert fine_tune.training_loss(weights, 5)({"logits": logits}, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_duplicates_drop_trains_without_the_conflicting_rows(tiny_model, train_csv, tmp_path):
    rows = pd.read_csv(train_csv, keep_default_na=False)
    question = rows[rows["QuestionId"] == 33471]
    first = question.iloc[0]
    other_label = next(label for label in question["Category"] + ":" + question["Misconception"]
                       if label != f"{first.Category}:{first.Misconception}")
    # Three copies of the first row's text, one with a different label: a conflicting group of four rows.
    conflict = pd.DataFrame([first] * 3)
    conflict["row_id"] = rows["row_id"].max() + np.arange(1, 4)
    conflict.iloc[0, conflict.columns.get_loc("Category")], conflict.iloc[0, conflict.columns.get_loc("Misconception")] = \
        other_label.split(":")
    data = tmp_path / "conflict.csv"
    pd.concat([rows, conflict]).to_csv(data, index=False)
    train_rows = {}
    for policy in ("keep", "drop"):
        output_dir = tmp_path / policy
        assert train.main(train_args(tiny_model, str(data), output_dir, "--questions", "33471", "--folds", "2",
                                     "--duplicates", policy)) == 0
        result = results(output_dir, 33471)
        train_rows[policy] = sum(fold["train_rows"] for fold in result["fold_results"])
        oof = pd.read_csv(output_dir / "question_33471" / "oof_best_map3.csv", keep_default_na=False)
        assert sorted(oof["row_id"]) == sorted(pd.concat([question, conflict])["row_id"])
    # The group sits in one fold's training side (and in the other's validation side, which is never changed).
    assert train_rows["keep"] - train_rows["drop"] == 4


def test_resume_retrains_a_question_trained_with_other_settings(tiny_model, train_csv, tmp_path, monkeypatch, caplog):
    import peft
    caplog.set_level("INFO")
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471,104665", "--epochs", "1")) == 0
    first = results(str(tmp_path), 33471)
    assert first["training_settings"]["EPOCHS"] == 1 and first["versions"]["peft"] == peft.__version__
    calls = []
    original = train.train_question
    monkeypatch.setattr(train, "train_question", lambda qid, *a: calls.append(qid) or original(qid, *a))
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471", "--epochs", "2")) == 0
    assert calls == [33471]
    assert "question 33471: trained with other inputs (--epochs 1 -> 2), retraining" in caplog.text
    caplog.clear()
    assert train.main(["--output-dir", str(tmp_path), "--questions", "33471,104665", "--summarize-only"]) == 0
    assert "questions 33471 trained with --epochs 2" in caplog.messages
    assert "questions 104665 trained with --epochs 1" in caplog.messages


def test_val_fraction_is_the_share_held_out(train_csv):
    df = read_competition_csv(train_csv, labelled=True)
    rows = df[df["QuestionId"] == 33471].reset_index(drop=True)
    for fraction in (0.15, 0.2, 0.4):
        config.VAL_FRACTION = fraction
        train_idx, val_idx = train.fold_splits(rows, 1, 0)[0]
        assert sorted(np.concatenate([train_idx, val_idx])) == list(range(len(rows)))
        assert len(val_idx) / len(rows) == pytest.approx(fraction, abs=0.03), fraction


def test_a_single_row_class_takes_every_row_of_its_text_into_training(train_csv):
    df = read_competition_csv(train_csv, labelled=True)
    rows = df[df["QuestionId"] == 33471].reset_index(drop=True)
    # The text of one row repeated with the label of no other row: a conflicting group of three.
    group = pd.concat([rows.iloc[[0, 0]], rows.iloc[[0]].assign(**{"Category:Misconception": "False_Misconception:Unique"})])
    rows = pd.concat([rows, group], ignore_index=True)
    key = rows["MC_Answer"] + rows["StudentExplanation"]
    for seed in range(20):
        train_idx, val_idx = train.fold_splits(rows, 1, seed)[0]
        assert len(rows) - 1 in train_idx
        assert not set(key[train_idx]) & set(key[val_idx]), seed


def test_the_headline_is_the_final_checkpoint_and_best_map3_is_labelled(trained, capsys, monkeypatch):
    """best_map3 is chosen on the rows it is scored on: an optimistic figure, never the headline."""
    import matplotlib.axes
    lines = {}
    axvline = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x=0, *a, **k: lines.update({k["label"]: x}) or axvline(self, x, *a, **k))
    assert train.main(["--output-dir", trained["output_dir"], "--summarize-only"]) == 0
    summary = json.load(open(os.path.join(trained["output_dir"], "summary", "all_questions_summary.json")))
    final, best = summary["overall_final_map3"], summary["overall_best_map3"]
    assert final <= best  # selection on the validation rows flatters best_map3
    assert (f"MAP@3 {final:.4f} (final checkpoint; best_map3 {best:.4f}, selected on these same rows)"
            in capsys.readouterr().out)
    assert lines[f"overall {final:.4f} (final checkpoint, row-weighted)"] == final
