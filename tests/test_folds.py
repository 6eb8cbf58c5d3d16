"""K-fold training: out-of-fold predictions and the fold ensemble at submit time."""
import os

import numpy as np
import pandas as pd
import pytest

import config
import submit
import train
from conftest import train_args
from data_collator import build_data_collator
from utils import (TORCH_DTYPES, correctness_of, decode_top_k, load_adapter, load_base_model, load_tokenizer,
                   map_at_k, predict_logits, read_competition_csv, read_json, read_question_results, softmax)

QUESTIONS = [33471, 104665]


@pytest.fixture(scope="module")
def folded(tiny_model, train_csv, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("folds")
    saved = config.snapshot()
    code = train.main(train_args(tiny_model, train_csv, output_dir, "--folds", "3", "--questions", ",".join(map(str, QUESTIONS))))
    config.update(saved)
    return {"output_dir": str(output_dir), "code": code}


def test_fold_layout_and_out_of_fold_file_covers_every_row_once(folded, train_csv):
    assert folded["code"] == 0
    df = read_competition_csv(train_csv, labelled=True)
    for question_id in QUESTIONS:
        question_dir = os.path.join(folded["output_dir"], f"question_{question_id}")
        for fold in range(3):
            for checkpoint in ("best", "best_map3"):
                assert os.path.isfile(os.path.join(question_dir, f"fold_{fold}", checkpoint, "adapter_model.safetensors"))
        result = read_json(os.path.join(folded["output_dir"], "summary", f"question_{question_id}_results.json"))
        rows = df[df["QuestionId"] == question_id]
        for checkpoint, key in (("best_map3", "best_map3"), ("best", "final_map3")):
            oof = pd.read_csv(os.path.join(question_dir, f"oof_{checkpoint}.csv"), keep_default_na=False, dtype={"row_id": str})
            assert sorted(oof["row_id"]) == sorted(rows["row_id"])
            assert set(oof["fold"]) == {0, 1, 2}
            assert list(oof.columns[3:]) == result["classes"]
            np.testing.assert_allclose(oof[result["classes"]].sum(axis=1), 1, atol=1e-5)
            truth = dict(zip(rows["row_id"], rows["Category:Misconception"]))
            assert (oof["label"] == oof["row_id"].map(truth)).all()
            ordered = rows.set_index("row_id").loc[oof["row_id"]]
            decoded = decode_top_k(oof[result["classes"]].to_numpy(), result["classes"], correctness_of(ordered), True)
            assert result[key] == pytest.approx(map_at_k(oof["label"].tolist(), decoded))
        assert result["val_rows"] == len(rows) and len(result["fold_results"]) == 3


def test_fold_ensemble_is_the_mean_of_the_fold_models(folded, tiny_model, test_csv):
    config.update({"OUTPUT_DIR": folded["output_dir"], "MODEL_NAME": tiny_model})
    test = pd.read_csv(test_csv, keep_default_na=False, dtype=str)
    test["QuestionId"] = test["QuestionId"].astype(int)
    rows = test[test["QuestionId"] == QUESTIONS[0]]
    result = read_question_results(QUESTIONS)[QUESTIONS[0]]
    tokenizer = load_tokenizer(tiny_model)
    predictor = submit.Predictor(load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu"), tokenizer, "cpu")
    labels, ensemble, models = predictor.probabilities(QUESTIONS[0], rows, result)
    assert models == (3, False)

    from prompts import encode_prompts
    input_ids, _ = encode_prompts(rows, tokenizer, result["prompt_version"], result["max_len"])
    probs = []
    for fold in range(3):
        base = load_base_model(tiny_model, tokenizer, TORCH_DTYPES["fp32"], "cpu")
        model = load_adapter(base, config.get_question_model_path(QUESTIONS[0], fold=fold), len(result["classes"]))
        probs.append(softmax(predict_logits(model, input_ids, build_data_collator(tokenizer), 8, "fp32")))
    assert not np.allclose(probs[0], probs[1])
    assert labels == result["classes"]
    np.testing.assert_allclose(ensemble, np.mean(probs, axis=0), atol=1e-6)


def test_resume_needs_every_fold(folded, tiny_model, train_csv):
    # The run's own settings: results trained with other ones are incomplete anyway.
    config.parse_args("x", "train", train_args(tiny_model, train_csv, folded["output_dir"], "--folds", "3"),
                      recipe=config.DEFAULT_RECIPE)
    rows = train.model_rows(read_competition_csv(train_csv, labelled=True), QUESTIONS[0])
    assert train.is_complete(QUESTIONS[0], rows)
    os.remove(config.get_question_model_path(QUESTIONS[0], "best", 2) + "/adapter_config.json")
    assert not train.is_complete(QUESTIONS[0], rows)
