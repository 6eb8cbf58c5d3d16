"""Fold ensemble against its single fold models, on rows none of them saw.

Out-of-fold MAP@3 scores one model per row, so it cannot tell what averaging the K fold models buys. This holds
out VAL_FRACTION of each question's rows (train.py's own split, repeated texts on one side), trains `--folds K`
on the rest with train.py and the given flags, then scores each fold model and the mean of their probabilities
(what submit.py predicts, with submit.py's own code) on the held-out rows:

    python benchmarks/fold_ensemble.py --model /work/minilm --train-data train.csv --questions 33471,109465 \
        --folds 3 --output-dir runs/fold_ensemble --lora-targets query,key,value,dense --prompt-version create_prompt_v1

It trains per-question models from scratch (recipes/seed.py) unless a recipe is given first. The training rows go
to OUTPUT_DIR/dev.csv; the held-out rows' scores to OUTPUT_DIR/summary/fold_ensemble.json.
"""
import os
import sys

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import submit  # noqa: E402
import train  # noqa: E402
from utils import (TARGET_COLUMN, TORCH_DTYPES, correctness_of, decode_top_k, load_base_model, load_tokenizer,  # noqa: E402
                   map_at_k, read_competition_csv, read_json, resolve_precision, setup_logging, write_json_atomic)


def split_holdout(df):
    """(training rows, held-out rows) per question, with train.py's single split."""
    dev, holdout = [], []
    for question_id in config.QUESTION_IDS:
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        train_idx, val_idx = train.fold_splits(rows, 1, config.SEED)[0]
        dev.append(rows.iloc[train_idx])
        holdout.append(rows.iloc[val_idx])
    return pd.concat(dev), pd.concat(holdout)


def score_holdout(holdout):
    """MAP@3 of every fold model and of their mean probabilities on each trained question's held-out rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(config.PRECISION, device)
    tokenizer = load_tokenizer(config.MODEL_NAME)
    predictor = submit.Predictor(load_base_model(config.MODEL_NAME, tokenizer, TORCH_DTYPES[precision], "cpu"), tokenizer, device)
    scores = {}
    for question_id, rows in holdout.groupby("QuestionId", sort=False):
        result = read_json(config.get_question_results_path(question_id))
        if result["status"] != "succeeded":
            continue
        classes, probs = predictor.fold_probabilities(question_id, rows, result)
        truth, correct = rows[TARGET_COLUMN].tolist(), correctness_of(rows)
        single = [map_at_k(truth, decode_top_k(p, classes, correct, config.CORRECTNESS_MASK)) for p in probs]
        ensemble = map_at_k(truth, decode_top_k(np.mean(probs, axis=0), classes, correct, config.CORRECTNESS_MASK))
        scores[int(question_id)] = {"rows": len(rows), "folds": single, "ensemble": ensemble}
        print(f"question {question_id}: {len(rows)} held-out rows, fold models MAP@3 "
              f"{' / '.join(f'{s:.4f}' for s in single)} (mean {np.mean(single):.4f}), ensemble {ensemble:.4f}", flush=True)
    rows = [entry["rows"] for entry in scores.values()]
    overall = {
        "rows": int(sum(rows)),
        "single_mean": float(np.average([np.mean(entry["folds"]) for entry in scores.values()], weights=rows)),
        "ensemble": float(np.average([entry["ensemble"] for entry in scores.values()], weights=rows)),
    }
    print(f"overall (row-weighted, {overall['rows']} rows): single fold model {overall['single_mean']:.4f}, "
          f"ensemble of {config.FOLDS} {overall['ensemble']:.4f}", flush=True)
    return {"per_question": scores, "overall": overall}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    args = config.parse_args(__doc__.splitlines()[0], "train", argv, recipe=config.SEED_RECIPE)
    if config.FOLDS < 2:
        raise SystemExit("error: --folds must be at least 2 for a fold ensemble")
    dev, holdout = split_holdout(read_competition_csv(config.TRAIN_DATA_PATH, labelled=True))
    os.makedirs(config.OUTPUT_DIR, exist_ok=True)
    dev_path = os.path.join(config.OUTPUT_DIR, "dev.csv")
    dev.to_csv(dev_path, index=False)
    flags = [arg for arg in argv if arg != args.recipe]
    if train.main([args.recipe, *flags, "--train-data", dev_path]) != 0:
        raise SystemExit("error: training failed; see the log above")
    results = score_holdout(holdout)
    write_json_atomic(os.path.join(config.get_summary_dir(), "fold_ensemble.json"), results)
    return results


if __name__ == "__main__":
    main()
