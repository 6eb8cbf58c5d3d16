"""Is run B better than run A, or lucky? Paired comparison of two `--folds K` runs' out-of-fold predictions.

Both runs score the same rows, so the difference in MAP@3 is measured row by row; a bootstrap over the rows
gives its 95% interval. An interval that straddles 0 means the data cannot tell the two runs apart. A run is an
output dir (its per-question models) or an output dir's `global/` (its global model). With `--blend-weights`,
B is also blended into A: (1 - w) A + w B over each row's labels, for each w. With `--ensemble`, the runs (two or
more output dirs) are the members of the ensemble `submit.py --output-dir A,B,...` fits (ensemble.py), scored
honestly: each fold's rows with the weights fitted on the other folds, beside each run alone and the weights fitted
on all rows (which flatter themselves).

    python benchmarks/compare_oof.py --train-data train.csv runs/baseline runs/with_lever [--checkpoint best]
    python benchmarks/compare_oof.py --train-data train.csv runs/q runs/g/global --blend-weights 0.25,0.5,0.75
    python benchmarks/compare_oof.py --train-data train.csv --ensemble runs/qwen runs/suffix runs/other_lr

(`--checkpoint`: which OOF file, oof_best_map3.csv or oof_best.csv.)
"""
import glob
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import ensemble  # noqa: E402
from utils import (InputError, blend_probabilities, correctness_of, decode_top_k, map_at_k, paired_difference,  # noqa: E402
                   question_label_mask, read_competition_csv, read_json)


def read_oof(run, checkpoint, question_of):
    """{QuestionId: OOF table indexed by row_id} of a run: its question_<id>/ files, or its global file split by
    question (a global model's file has every selected question's rows)."""
    if os.path.basename(os.path.normpath(run)) == config.GLOBAL:
        table = pd.read_csv(os.path.join(run, f"oof_{checkpoint}.csv"), keep_default_na=False, dtype={"row_id": str})
        results = os.path.join(os.path.dirname(os.path.normpath(run)), "summary", "global_results.json")
        question_classes = read_json(results).get("question_classes", {}) if os.path.isfile(results) else {}
        tables = {}
        for question_id, part in table.groupby(table["row_id"].map(question_of)):
            # Only the question's labels, as submit.py ranks them.
            own = question_label_mask([question_id], part.columns[3:], question_classes)[0]
            tables[int(question_id)] = part.set_index("row_id")[["fold", "label", *part.columns[3:][own]]]
        return tables
    tables = {}
    for path in glob.glob(os.path.join(run, "question_*", f"oof_{checkpoint}.csv")):
        question_id = int(os.path.basename(os.path.dirname(path)).split("_")[1])
        tables[question_id] = pd.read_csv(path, keep_default_na=False, dtype={"row_id": str}).set_index("row_id")
    if not tables:
        raise SystemExit(f"error: {run}: no question_<id>/oof_{checkpoint}.csv (train with --folds K)")
    return tables


def row_scores(table, labels, probs, correct_by_row):
    """MAP@3 of each row of an OOF table from (labels, probabilities) for its rows (correctness mask on)."""
    correct = [correct_by_row[row_id] for row_id in table.index]
    top3 = decode_top_k(probs, labels, correct, True)
    return pd.Series([map_at_k([truth], [ranked]) for truth, ranked in zip(table["label"], top3)], index=table.index)


def parts(table):
    labels = list(table.columns[2:])
    return labels, table[labels].to_numpy(float)


def compare(train_data, run_a, run_b, checkpoint, blend_weights=()):
    """{question: (rows, MAP@3 of A, of B, of each blend)}, and per compared score the overall difference to A
    with its 95% interval: [("B", mean, (low, high)), ("blend w", ...), ...]."""
    rows = read_competition_csv(train_data, labelled=True)
    correct = dict(zip(rows["row_id"], correctness_of(rows)))
    question_of = dict(zip(rows["row_id"], rows["QuestionId"]))
    tables_a, tables_b = read_oof(run_a, checkpoint, question_of), read_oof(run_b, checkpoint, question_of)
    missing = sorted(set(tables_a) - set(tables_b))
    if missing:
        raise SystemExit(f"error: {run_b}: no out-of-fold rows for question(s) {missing}")
    per_question, differences = {}, {}
    for question_id in sorted(tables_a):
        a, b = tables_a[question_id], tables_b[question_id]
        if set(a.index) != set(b.index) or not (b.loc[a.index, "fold"] == a["fold"]).all():
            raise SystemExit(f"error: question {question_id}: the two runs' OOF files cover different rows or folds")
        b = b.loc[a.index]
        scores = {"A": row_scores(a, *parts(a), correct), "B": row_scores(b, *parts(b), correct)}
        for weight in blend_weights:
            labels, probs = blend_probabilities([(1 - weight, *parts(a)), (weight, *parts(b))])
            scores[f"blend {weight:g}"] = row_scores(a, labels, probs, correct)
        per_question[question_id] = (len(a), {name: score.mean() for name, score in scores.items()})
        for name, score in scores.items():
            differences.setdefault(name, []).append((score - scores["A"]).to_numpy())
    return per_question, [(name, *paired_difference(np.concatenate(diffs))) for name, diffs in differences.items() if name != "A"]


def compare_ensemble(train_data, runs, checkpoint):
    """compare's figures for the ensemble of `runs`: each run alone, the weights fitted on all rows, and each fold
    scored with the weights fitted on the other folds; the differences: the cross-fold ensemble minus each run."""
    try:
        rows = read_competition_csv(train_data, labelled=True)
        vectors = ensemble.grid(len(runs))
        scores, questions, folds = ensemble.score_grid(rows, ensemble.run_oofs(rows, runs, checkpoint), vectors)
        honest = ensemble.cross_fold_scores(scores, questions, folds)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    shared, own = ensemble.fit(scores, questions, folds, np.ones(len(questions), dtype=bool))
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    columns = {name: scores[ensemble.alone(vectors, run)] for run, name in enumerate(names)}
    columns["ensemble (fitted)"] = scores[ensemble.chosen_vectors(shared, own, questions), np.arange(len(questions))]
    columns["ensemble (cross-fold)"] = honest
    per_question = {int(q): (int((questions == q).sum()), {name: float(column[questions == q].mean())
                                                          for name, column in columns.items()})
                    for q in np.unique(questions)}
    return per_question, [(f"ensemble (cross-fold) - {name}", *paired_difference(honest - columns[name])) for name in names]


def main(argv=None):
    def run_dirs(parser):
        parser.add_argument("runs", nargs="+", help="output dirs (or their global/): the reference run A and the run B "
                                                    "compared with it; with --ensemble, the ensemble's runs")
        parser.add_argument("--blend-weights", default="", help="comma-separated weights w of B in (1 - w) A + w B")
        parser.add_argument("--ensemble", action="store_true",
                            help="score the ensemble of the runs that submit.py fits, each fold with weights fitted on the others")
    args = config.parse_args(__doc__.splitlines()[0], "compare_oof", argv, extra_arguments=run_dirs)
    weights = [float(w) for w in args.blend_weights.split(",") if w.strip()]
    if args.ensemble:
        if len(args.runs) < 2 or weights:
            raise SystemExit("error: --ensemble takes two or more runs, without --blend-weights")
        per_question, compared = compare_ensemble(config.TRAIN_DATA_PATH, args.runs, config.CHECKPOINT)
    elif len(args.runs) != 2:
        raise SystemExit(f"error: give two runs, A and B ({len(args.runs)} given), or --ensemble")
    else:
        per_question, compared = compare(config.TRAIN_DATA_PATH, *args.runs, config.CHECKPOINT, weights)
    names = list(next(iter(per_question.values()))[1])
    width = {name: max(11, len(name)) for name in names}
    print("question rows " + " ".join(f"{name:>{width[name]}}" for name in names))
    for question_id, (rows, scores) in per_question.items():
        print(f"{question_id:>8} {rows:>4} " + " ".join(f"{scores[name]:>{width[name]}.4f}" for name in names))
    rows = sum(entry[0] for entry in per_question.values())
    overall = {name: sum(n * scores[name] for n, scores in per_question.values()) / rows for name in names}
    print(f"{'all':>8} {rows:>4} " + " ".join(f"{overall[name]:>{width[name]}.4f}" for name in names))
    for name, mean, (low, high) in compared:
        print(f"{name if args.ensemble else name + ' - A'}: {mean:+.4f} (95% bootstrap interval {low:+.4f} to {high:+.4f})")
    return per_question, compared


if __name__ == "__main__":
    main()
