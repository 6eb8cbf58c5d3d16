"""What a run's submission scores on rows none of its models saw: each seed alone and the seeds' average, with the
fold models, the models refit on all rows (--refit) or both.

Out-of-fold MAP@3 scores one fold model per row: it cannot score a model trained on every row (--refit), nor an
average of models. This holds out --val-fraction of each question's rows (train.py's own split, as
benchmarks/fold_ensemble.py does), trains the recipe on the rest with the given flags, then predicts the held-out
rows with submit.py's own code under each variant and scores every variant against the first (the first seed's
fold models: what a plain --folds K run submits), row by row with a bootstrap interval:

    python benchmarks/heldout.py recipes/minilm.py --model /work/minilm --train-data train.csv \
        --questions 33471,109465 --val-fraction 0.333 --folds 2 --seeds 42,43 --refit --output-dir runs/heldout

The training rows go to OUTPUT_DIR/dev.csv, the scores to OUTPUT_DIR/summary/heldout.json. A rerun trains nothing
that is complete and scores again.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
import ensemble  # noqa: E402
import submit  # noqa: E402
import train  # noqa: E402
from fold_ensemble import split_holdout  # noqa: E402
from utils import (TARGET_COLUMN, average_precisions, paired_difference, read_competition_csv, read_json,  # noqa: E402
                   read_question_results, setup_logging, write_json_atomic)


def has_refit(run_dir):
    with ensemble.in_run(run_dir):
        return any("refit" in result for result in read_question_results([*config.QUESTION_IDS, config.GLOBAL]).values())


def predicted_parts(holdout, seed_dirs, modes):
    """{(seed dir, mode): {QuestionId: part}} of submit.run_probabilities for the held-out rows."""
    devices = submit.visible_devices()[:1]
    predictors = submit.load_predictors(config.MODEL_NAME, devices)
    bar = submit.tqdm(disable=True)
    parts = {}
    for mode in modes:
        if mode:
            config.update({"PREDICT_WITH": mode})
        for seed_dir in seed_dirs:
            with ensemble.in_run(seed_dir):
                parts[seed_dir, mode] = submit.run_probabilities(holdout, devices, lambda _: predictors, bar)
    return parts


def row_scores(holdout, parts):
    """Per-row MAP@3 of the held-out rows (in their order) from {QuestionId: part}."""
    scores = np.zeros(len(holdout))
    for question_id, index in holdout.groupby("QuestionId", sort=False).indices.items():
        rows = holdout.iloc[index]
        labels, probs, fill = parts[int(question_id)][:3]
        scores[index] = average_precisions(rows[TARGET_COLUMN].to_numpy(), submit.decode(labels, probs, fill, rows))
    return scores


def variants(holdout, run_dir, modes):
    """{name: per-row MAP@3}: each seed alone and, with several, their average, for each mode."""
    seed_dirs = ensemble.seed_dirs(run_dir)
    seeds = read_json(ensemble.seeds_path(run_dir))["seeds"] if len(seed_dirs) > 1 else ["of the run"]
    names = {seed_dir: f"seed {seed}" for seed_dir, seed in zip(seed_dirs, seeds)}
    parts = predicted_parts(holdout, seed_dirs, modes)
    scores = {}
    for mode in modes:
        suffix = f", {mode}" if mode else ""
        for seed_dir in seed_dirs:
            scores[names[seed_dir] + suffix] = row_scores(holdout, parts[seed_dir, mode])
        if len(seed_dirs) > 1:
            average = submit.average_seeds([parts[seed_dir, mode] for seed_dir in seed_dirs], seed_dirs)
            scores[f"{len(seed_dirs)} seeds averaged{suffix}"] = row_scores(holdout, average)
    return scores


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    args = config.parse_args(__doc__.splitlines()[0], "train", argv, recipe=config.DEFAULT_RECIPE)
    dev, holdout = split_holdout(read_competition_csv(config.TRAIN_DATA_PATH, labelled=True))
    output_dir = config.OUTPUT_DIR
    os.makedirs(output_dir, exist_ok=True)
    dev_path = os.path.join(output_dir, "dev.csv")
    dev.to_csv(dev_path, index=False)
    flags = [arg for arg in argv if arg != args.recipe]
    if train.main([args.recipe, *flags, "--train-data", dev_path]) != 0:
        raise SystemExit("error: training failed; see the log above")
    config.update({"OUTPUT_DIR": output_dir})
    modes = ["folds", "refit", "both"] if has_refit(output_dir) else [None]
    holdout = holdout.reset_index(drop=True)
    scores = variants(holdout, output_dir, modes)
    first = next(iter(scores))
    record = {"rows": len(holdout), "questions": config.QUESTION_IDS, "baseline": first, "variants": {}}
    print(f"{len(holdout)} held-out rows of questions {','.join(map(str, config.QUESTION_IDS))}", flush=True)
    for name, per_row in scores.items():
        mean, interval = paired_difference(per_row - scores[first])
        per_question = {str(q): float(per_row[index].mean()) for q, index in holdout.groupby("QuestionId").indices.items()}
        record["variants"][name] = {"map3": float(per_row.mean()), "minus_baseline": {"mean": mean, "interval": list(interval)},
                                    "per_question": per_question}
        print(f"{name:32s} MAP@3 {per_row.mean():.4f}   {mean:+.4f} ({interval[0]:+.4f} to {interval[1]:+.4f}) "
              f"against {first}   " + "  ".join(f"{q} {s:.4f}" for q, s in per_question.items()), flush=True)
    write_json_atomic(os.path.join(output_dir, "summary", "heldout.json"), record)
    return record


if __name__ == "__main__":
    main()
