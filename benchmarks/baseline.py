"""TF-IDF + logistic regression per question, on train.py's own validation split or folds.

The bar a fine-tuned model has to clear: `python benchmarks/baseline.py --train-data train.csv --questions 33471,109465`
prints validation MAP@3 per question and row-weighted overall, with the same correctness mask as train.py;
with `--folds K`, out-of-fold MAP@3 over every row, on the same folds as `train.py --folds K`, and the out-of-fold
probabilities in train.py's format (`OUTPUT_DIR/question_<id>/oof_best.csv`), for benchmarks/compare_oof.py.
"""
import os
import sys

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from train import fold_splits  # noqa: E402
from utils import TARGET_COLUMN, correctness_of, decode_top_k, map_at_k, read_competition_csv  # noqa: E402


def baseline_map3(rows, splits):
    """MAP@3 (masked and not) over the validation rows of every split, each predicted by a model fit without them,
    the number of those rows, and their probabilities as an out-of-fold table."""
    text = (rows["MC_Answer"] + " || " + rows["StudentExplanation"]).to_numpy()
    labels = rows[TARGET_COLUMN].to_numpy()
    truth, predicted, tables = [], {True: [], False: []}, []
    for fold, (train_idx, val_idx) in enumerate(splits):
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=10, max_iter=3000))
        model.fit(text[train_idx], labels[train_idx])
        probs = model.predict_proba(text[val_idx])
        correct = correctness_of(rows.iloc[val_idx])
        truth += list(labels[val_idx])
        for mask in predicted:
            predicted[mask] += decode_top_k(probs, model.classes_, correct, mask)
        table = pd.DataFrame(probs, columns=model.classes_)
        table.insert(0, "row_id", rows["row_id"].to_numpy()[val_idx])
        table.insert(1, "fold", fold)
        table.insert(2, "label", labels[val_idx])
        tables.append(table)
    oof = pd.concat(tables).fillna(0.0)  # a label absent from one fold's training rows has no column there
    return {mask: map_at_k(truth, predicted[mask]) for mask in predicted}, len(truth), oof


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], "baseline", argv)
    df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
    scores, weights = [], []
    for question_id in config.QUESTION_IDS:
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        if rows[TARGET_COLUMN].nunique() < 2:
            continue
        score, val_rows, oof = baseline_map3(rows, fold_splits(rows, config.FOLDS, config.SEED))
        if config.FOLDS > 1:
            os.makedirs(config.get_question_output_dir(question_id), exist_ok=True)
            oof.to_csv(os.path.join(config.get_question_output_dir(question_id), "oof_best.csv"), index=False)
        scores.append([score[True], score[False]])
        weights.append(val_rows)
        print(f"question {question_id}: val rows {val_rows}, MAP@3 {score[True]:.4f} (unmasked {score[False]:.4f})")
    overall = np.average(scores, axis=0, weights=weights)
    print(f"overall (row-weighted): MAP@3 {overall[0]:.4f} (unmasked {overall[1]:.4f})")


if __name__ == "__main__":
    main()
