"""Is run B better than run A, or lucky? Paired comparison of two `--folds K` runs' out-of-fold predictions.

Both runs score the same rows, so the difference in MAP@3 is measured row by row; a bootstrap over the rows
gives its 95% interval. An interval that straddles 0 means the data cannot tell the two runs apart.

    python benchmarks/compare_oof.py --train-data train.csv runs/baseline runs/with_lever [--checkpoint best]

(`--checkpoint`: which OOF file, oof_best_map3.csv or oof_best.csv.)
"""
import glob
import os
import re
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from utils import correctness_of, decode_top_k, map_at_k, read_competition_csv  # noqa: E402


def row_scores(run_dir, question_id, checkpoint, correct_by_row):
    """Per row of a question's OOF file: its row_id and the MAP@3 of its top 3 (correctness mask on)."""
    oof = pd.read_csv(os.path.join(run_dir, f"question_{question_id}", f"oof_{checkpoint}.csv"), keep_default_na=False,
                      dtype={"row_id": str})
    classes = list(oof.columns[3:])
    top3 = decode_top_k(oof[classes].to_numpy(float), classes, [correct_by_row[r] for r in oof["row_id"]], True)
    return pd.Series([map_at_k([truth], [labels]) for truth, labels in zip(oof["label"], top3)], index=oof["row_id"])


def compare(train_data, run_a, run_b, checkpoint, samples=2000, seed=0):
    """{question: (rows, MAP@3 of A, of B)} and the overall difference B - A with its bootstrap 95% interval."""
    df = read_competition_csv(train_data, labelled=True)
    correct_by_row = dict(zip(df["row_id"], correctness_of(df)))
    pattern = re.compile(r"question_(\d+)$")
    questions = sorted(int(pattern.search(path).group(1)) for path in glob.glob(os.path.join(run_a, "question_*"))
                       if pattern.search(path) and os.path.isfile(os.path.join(path, f"oof_{checkpoint}.csv")))
    per_question, differences = {}, []
    for question_id in questions:
        a = row_scores(run_a, question_id, checkpoint, correct_by_row)
        b = row_scores(run_b, question_id, checkpoint, correct_by_row)
        if set(a.index) != set(b.index):
            raise SystemExit(f"error: question {question_id}: the two runs' OOF files cover different rows")
        b = b.loc[a.index]
        per_question[question_id] = (len(a), a.mean(), b.mean())
        differences.append((b - a).to_numpy())
    if not differences:
        raise SystemExit(f"error: {run_a}: no question_<id>/oof_{checkpoint}.csv (train with --folds K)")
    differences = np.concatenate(differences)
    rng = np.random.default_rng(seed)
    boot = differences[rng.integers(0, len(differences), (samples, len(differences)))].mean(axis=1)
    return per_question, differences.mean(), np.percentile(boot, [2.5, 97.5])


def main(argv=None):
    def run_dirs(parser):
        parser.add_argument("run_a", help="output dir of the reference run")
        parser.add_argument("run_b", help="output dir of the run compared with it")
    args = config.parse_args(__doc__.splitlines()[0], "compare_oof", argv, extra_arguments=run_dirs)
    per_question, mean, (low, high) = compare(config.TRAIN_DATA_PATH, args.run_a, args.run_b, config.CHECKPOINT)
    for question_id, (rows, a, b) in per_question.items():
        print(f"question {question_id}: {rows} rows, MAP@3 {a:.4f} -> {b:.4f} ({b - a:+.4f})")
    rows = sum(entry[0] for entry in per_question.values())
    overall_a = sum(entry[0] * entry[1] for entry in per_question.values()) / rows
    print(f"overall ({rows} rows): MAP@3 {overall_a:.4f} -> {overall_a + mean:.4f}, difference {mean:+.4f} "
          f"(95% bootstrap interval {low:+.4f} to {high:+.4f})")
    return per_question, mean, (low, high)


if __name__ == "__main__":
    main()
