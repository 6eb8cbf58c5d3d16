"""submit.py: round trip, adapter swapping, the correctness mask and every fallback."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import config
import submit
from conftest import SINGLE_CLASS_QUESTION
from prompt_utils import answer_is_correct
from data_collator import build_data_collator
from prompts import encode_prompts
from utils import (TORCH_DTYPES, attach_lora_from, correctness_of, label_probabilities, load_adapter, load_backbone,
                   load_base_model, load_tokenizer, predict_logits, read_competition_csv, read_json, read_question_results,
                   write_json_atomic)

TRAINED = [31772, 33471, 104665]


def run_submit(trained, tiny_model, test_csv, tmp_path, *extra):
    path = tmp_path / "submission.csv"
    code = submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", trained["output_dir"],
                        "--submission", str(path), *extra])
    return code, path


def read_submission(path):
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def test_round_trip_writes_every_row_in_order_with_three_distinct_labels(trained, tiny_model, test_csv, tmp_path, capsys):
    code, path = run_submit(trained, tiny_model, test_csv, tmp_path)
    assert code == 0
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    questions = test["QuestionId"].nunique()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{questions - 1} of {questions} questions predicted by their model; 1 by label frequencies "
        f"(one class in training: {SINGLE_CLASS_QUESTION})")
    written = read_submission(path)
    assert list(written.columns) == ["row_id", "Category:Misconception"]
    assert written["row_id"].tolist() == test["row_id"].tolist()
    for question_id, labels in zip(test["QuestionId"].astype(int), written["Category:Misconception"].str.split()):
        assert len(set(labels)) == 3
        classes = read_json(os.path.join(trained["output_dir"], "summary", f"question_{question_id}_results.json"))["classes"]
        if len(classes) >= 3:
            assert set(labels) <= set(classes), (question_id, labels)


def test_the_base_model_is_loaded_once(trained, tiny_model, test_csv, tmp_path, monkeypatch):
    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    assert run_submit(trained, tiny_model, test_csv, tmp_path)[0] == 0
    assert len(loads) == 1


def test_swapped_adapters_predict_as_each_adapter_alone(trained, tiny_model, test_csv):
    config.update({"OUTPUT_DIR": trained["output_dir"], "MODEL_NAME": tiny_model})
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    test["QuestionId"] = test["QuestionId"].astype(int)
    tokenizer = load_tokenizer(tiny_model)
    shared = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
    results = read_question_results(TRAINED)
    for question_id in TRAINED + TRAINED[::-1]:
        rows = test[test["QuestionId"] == question_id]
        labels, swapped, _ = shared.probabilities(question_id, rows, results[question_id])
        alone = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
        alone_labels, alone_probs, _ = alone.probabilities(question_id, rows, results[question_id])
        assert labels == alone_labels == results[question_id]["classes"]
        np.testing.assert_allclose(swapped, alone_probs, atol=1e-6)


def base_weights(model):
    return {name: value.clone() for name, value in model.state_dict().items() if "score" not in name}


@pytest.fixture
def adapter_on_fresh_base(trained, tiny_model):
    """(tokenizer, the base's weights before, question 31772's adapter attached to that base, its classes)."""
    tokenizer = load_tokenizer(tiny_model)
    base = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
    before = base_weights(base)
    classes = read_json(os.path.join(trained["output_dir"], "summary", "question_31772_results.json"))["classes"]
    model = load_adapter(base, os.path.join(trained["output_dir"], "question_31772", "best_map3"), len(classes))
    return tokenizer, before, model, classes


def test_swapping_leaves_the_base_model_unchanged(adapter_on_fresh_base):
    tokenizer, before, model, classes = adapter_on_fresh_base
    logits = predict_logits(model, [[1, 2, 3]], submit.build_data_collator(tokenizer), 1, "fp32")
    assert logits.shape == (1, len(classes))
    after = base_weights(model.unload())
    assert after.keys() == before.keys()
    assert all((after[name] == before[name]).all() for name in before)


def test_merged_lora_predicts_as_unmerged_and_restores_the_base_exactly(adapter_on_fresh_base):
    from utils import lora_merged
    tokenizer, before, model, _ = adapter_on_fresh_base
    probe = [tokenizer("Answer: 3 (incorrect)\nExplanation: mistake wnb")["input_ids"], [1, 2, 3]]
    collator = submit.build_data_collator(tokenizer)
    unmerged = predict_logits(model, probe, collator, 2, "fp32")
    with lora_merged(model):
        merged = predict_logits(model, probe, collator, 2, "fp32")
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    assert np.allclose(predict_logits(model, probe, collator, 2, "fp32"), unmerged, atol=1e-6)
    after = base_weights(model.unload())
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_merge_that_fails_halfway_leaves_the_base_as_it_was(adapter_on_fresh_base):
    """The base model serves every later question: layers merged before the failure must not stay merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from utils import lora_merged
    _, before, model, _ = adapter_on_fresh_base
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    layers[len(layers) // 2].merge = out_of_memory
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        with lora_merged(model):
            pass
    assert not any(layer.merged for layer in layers)
    after = base_weights(model.unload())
    assert all(torch.equal(after[name], before[name]) for name in before)


# Largest difference in probability between the two paths over 33471's 150 rows, measured here: fp32 1.2e-7 unmerged,
# 4.1e-7 merged; bf16 1.0e-3 unmerged, 5.5e-3 merged (the merged weights are rounded to bf16 once more), top-3
# identical. With the RoPE frequencies cast to bf16 (before this test): 2.4e-3 and 7.1e-3, one top-3 in 450 swapped.
PARITY_TOLERANCE = {"fp32": 1e-6, "bf16": 2e-2}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_submit_runs_the_model_train_validated(trained, tiny_model, train_csv, precision):
    """A saved adapter gives the same probabilities through train.py's evaluation (the base loaded as training loads
    it, LoRA and head attached trainable in fp32) and through submit.py's Predictor, merged and not; the RoPE
    frequencies stay in fp32 in both."""
    config.update({"OUTPUT_DIR": trained["output_dir"], "PRECISION": precision, "CHECKPOINT": "best"})
    result = read_question_results([33471])[33471]
    rows = read_competition_csv(train_csv, labelled=True).query("QuestionId == 33471").reset_index(drop=True)
    tokenizer = load_tokenizer(tiny_model)
    input_ids, _ = encode_prompts(rows, tokenizer, result["prompt_version"], result["max_len"])
    backbone = load_backbone(tiny_model, "cpu")
    model = attach_lora_from(backbone.model, config.get_question_model_path(33471), list(range(result["num_classes"])))
    try:
        logits = predict_logits(model, input_ids, build_data_collator(tokenizer), 8, precision)
    finally:
        model.unload()
    validated = label_probabilities(logits, result["classes"], correctness_of(rows))[1]
    predictor = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES[precision], "cpu"), tokenizer, "cpu")
    assert predictor.precision == precision
    rope = [buffer.dtype for name, buffer in predictor.base_model.named_buffers() if name.endswith("inv_freq")]
    assert rope and set(rope) == {torch.float32}
    for merge in (False, True):
        config.update({"MERGE_LORA": merge})
        submitted = predictor.fold_probabilities(33471, rows, result)[1][0]
        np.testing.assert_allclose(submitted, validated, atol=PARITY_TOLERANCE[precision], err_msg=f"merged {merge}")
        top3 = np.argsort(-submitted, axis=1)[:, :3]
        assert (top3 == np.argsort(-validated, axis=1)[:, :3]).mean() >= 0.99


def test_correctness_mask_keeps_predictions_on_the_side_of_the_answer(trained, tiny_model, test_csv, tmp_path):
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    masked = read_submission(run_submit(trained, tiny_model, test_csv, tmp_path)[1])
    unmasked = read_submission(run_submit(trained, tiny_model, test_csv, tmp_path, "--no-correctness-mask")[1])
    for row, labels in zip(test.itertuples(), masked["Category:Misconception"].str.split()):
        if int(row.QuestionId) == SINGLE_CLASS_QUESTION:  # its one class comes first, whatever the answer
            assert labels[0] == "True_Correct:NA"
            continue
        verdict = answer_is_correct(int(row.QuestionId), row.MC_Answer)
        assert labels[0].startswith("True_" if verdict else "False_")
    assert (masked["Category:Misconception"] != unmasked["Category:Misconception"]).any()


def copy_run(trained, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(trained["output_dir"], output_dir)
    return {"output_dir": str(output_dir)}


def frequency_top3(run, question_id, correct):
    counts = read_json(os.path.join(run["output_dir"], "summary", f"question_{question_id}_results.json"))["label_counts"]
    prefix = "True_" if correct else "False_"
    ranked = sorted(counts, key=lambda label: (not label.startswith(prefix), -counts[label]))
    return ranked[:3]


def poison_head(adapter):
    """NaN head weights: non-finite logits in any precision."""
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    weights = {key: value * float("nan") if ".score." in key else value for key, value in weights.items()}
    save_file(weights, os.path.join(adapter, "adapter_model.safetensors"))


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "non-finite", "classes differ"])
def test_broken_adapter_falls_back_to_label_frequencies_and_exits_1(trained, tiny_model, test_csv, tmp_path, damage, caplog, capsys):
    run = copy_run(trained, tmp_path)
    adapter = os.path.join(run["output_dir"], "question_31772", "best_map3")
    if damage == "deleted":
        shutil.rmtree(adapter)
    elif damage == "corrupted":
        with open(os.path.join(adapter, "adapter_model.safetensors"), "r+b") as handle:
            handle.write(b"garbage" * 10)
    elif damage == "non-finite":
        poison_head(adapter)
    else:
        results_path = os.path.join(run["output_dir"], "summary", "question_31772_results.json")
        result = read_json(results_path)
        write_json_atomic(results_path, {**result, "classes": result["classes"][::-1]})
    code, path = run_submit(run, tiny_model, test_csv, tmp_path)
    assert code == 1  # after writing the complete file
    assert "question 31772: model unusable" in caplog.text
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.endswith(f"2 by label frequencies (model unusable: 31772; one class in training: {SINGLE_CLASS_QUESTION})")
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    written = read_submission(path)
    rows = test["QuestionId"] == "31772"
    for answer, labels in zip(test.loc[rows, "MC_Answer"], written.loc[rows, "Category:Misconception"]):
        assert labels.split() == frequency_top3(run, 31772, answer_is_correct(31772, answer))
    other = test["QuestionId"] == "33471"
    reference = read_submission(run_submit(trained, tiny_model, test_csv, tmp_path)[1])
    assert written.loc[other].equals(reference.loc[other])


def test_no_training_results_stop_before_anything_is_written_unless_fallback_is_allowed(
        trained, tiny_model, test_csv, tmp_path, capsys):
    """A mistyped --output-dir (or summary/ missing from a dataset) wrote label frequencies for every row, exit 1,
    which a notebook's `!python` cell ignores."""
    run = copy_run(trained, tmp_path)
    shutil.rmtree(os.path.join(run["output_dir"], "summary"))
    code, path = run_submit(run, tiny_model, test_csv, tmp_path)
    assert code == 2 and not os.path.exists(path)
    assert capsys.readouterr().err.strip() == (f"error: --output-dir {run['output_dir']}: no training results "
                                               "(summary/*_results.json) for any question; check the path "
                                               "(--allow-fallback writes label frequencies)")
    code, path = run_submit(run, tiny_model, test_csv, tmp_path, "--allow-fallback")
    assert code == 0 and len(read_submission(path)) == len(pd.read_csv(test_csv))
    questions = pd.read_csv(test_csv)["QuestionId"].nunique()
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"0 of {questions} questions predicted by their model; {questions} by label frequencies (no training results: ")


def test_an_unwritable_submission_path_stops_before_the_first_forward_pass(trained, tiny_model, test_csv, tmp_path,
                                                                           capsys, monkeypatch):
    monkeypatch.setattr(submit, "predict", lambda *args, **kwargs: pytest.fail("predicted before checking the path"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = blocker / "submission.csv"
    code = submit.main(["--model", tiny_model, "--test-data", test_csv, "--output-dir", trained["output_dir"],
                        "--submission", str(path)])
    assert code == 2 and capsys.readouterr().err.strip().startswith(f"error: --submission {path}: cannot be written (")


def test_an_unreadable_label_encoder_is_replaced_by_the_classes_in_the_results(trained, tiny_model, test_csv, tmp_path, caplog):
    """An older scikit-learn may not unpickle the encoder: the model still predicts."""
    run = copy_run(trained, tmp_path)
    encoder = os.path.join(run["output_dir"], "question_31772", "label_encoder.joblib")
    with open(encoder, "wb") as handle:
        handle.write(b"not a pickle")
    code, path = run_submit(run, tiny_model, test_csv, tmp_path)
    assert code == 0
    assert f"question 31772: {encoder} unreadable" in caplog.text
    reference = read_submission(run_submit(trained, tiny_model, test_csv, tmp_path)[1])
    assert read_submission(path).equals(reference)


def test_unseen_question_and_single_class_question(trained, tiny_model, tmp_path, caplog, capsys):
    test = pd.DataFrame({"row_id": ["a", "b", "c"], "QuestionId": [999, SINGLE_CLASS_QUESTION, 999],
                         "QuestionText": "q", "MC_Answer": ["x", "Likely", "y"], "StudentExplanation": ["e", "f", ""]})
    test_path = tmp_path / "test.csv"
    test.to_csv(test_path, index=False)
    code, path = run_submit(trained, tiny_model, str(test_path), tmp_path)
    assert code == 0
    written = read_submission(path)
    assert written["row_id"].tolist() == ["a", "b", "c"]
    labels = written["Category:Misconception"].str.split().tolist()
    assert labels[1][0] == "True_Correct:NA" and len(set(labels[1])) == 3
    assert labels[0] == labels[2] and labels[0][0] == "True_Correct:NA" and len(set(labels[0])) == 3
    assert "question 999: never trained; using global label frequencies" in caplog.text
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["question", "rows", "predicted", "by", "seconds"]
    assert table[1].split()[:-1] == ["999", "2", "global", "label", "frequencies", "(never", "trained)"]  # by QuestionId
    assert table[2].split()[:-1] == [str(SINGLE_CLASS_QUESTION), "1", "its", "label", "frequencies", "(one", "class", "in", "training)"]


def test_two_devices_predict_the_same_as_one(trained, tiny_model, test_csv):
    config.update({"OUTPUT_DIR": trained["output_dir"], "MODEL_NAME": tiny_model})
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    test["QuestionId"] = test["QuestionId"].astype(int)
    assert submit.predict(test, ["cpu", "cpu"])[0] == submit.predict(test, ["cpu"])[0]


def test_balance_spreads_rows_evenly():
    groups = [(q, [0] * n) for q, n in [(1, 90), (2, 50), (3, 40), (4, 10)]]
    loads = sorted(sum(len(rows) for _, rows in work) for work in submit.balance(groups, 2))
    assert loads == [90, 100]


def test_empty_test_writes_only_the_header(trained, tiny_model, tmp_path):
    test_path = tmp_path / "test.csv"
    test_path.write_text("row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation\n")
    code, path = run_submit(trained, tiny_model, str(test_path), tmp_path)
    assert code == 0 and path.read_text() == "row_id,Category:Misconception\n"


@pytest.mark.parametrize("content, message", [
    ("row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation\n1,31772,q,a,e\n1,31772,q,a,f\n", "column row_id has duplicate value(s) 1"),
    ("row_id,QuestionId,QuestionText,MC_Answer\n1,31772,q,a\n", "missing column(s) StudentExplanation"),
])
def test_malformed_test_csv_is_a_clear_error(trained, tiny_model, tmp_path, capsys, content, message):
    test_path = tmp_path / "test.csv"
    test_path.write_text(content)
    code, path = run_submit(trained, tiny_model, str(test_path), tmp_path)
    assert code == 2 and not path.exists()
    assert capsys.readouterr().err.strip() == f"error: {test_path}: {message}"


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        submit.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--test-data", "--output-dir", "--submission", "--checkpoint", "--batch-size", "--questions"):
        assert flag in help_text
