"""Ensembles of runs: `submit.py --output-dir A,B,...` averages runs of other recipes, backbones or label spaces.

Each run contributes, per question, its final probabilities as submit.py makes them alone (its question model and
global model at its chosen weight). The runs' weights are fitted on their out-of-fold files, over the rows all runs
share: every vector of the grid of step GRID_STEP over the simplex is scored by MAP@3, ties going to the most even
one. One vector serves all questions; a question gets its own only where that beats the shared vector fitted on the
other folds, scored fold by fold on its held-out rows (a question's few hundred rows would otherwise pick the
weights that fit their noise). The weights and scores are written to ensemble.json beside the submission.

A run trained with several seeds (train.py --seeds) is one run here: its seeds' runs averaged at equal weights.
"""
import contextlib
import itertools
import os

import numpy as np

import config
from sources import CHECKPOINTS, run_oof
from utils import (InputError, average_precisions, blend_probabilities, correctness_of, decode_top_k, paired_difference,
                   read_json, write_json_atomic)

GRID_STEP = 0.1


def run_dirs():
    """The runs of --output-dir (a comma list)."""
    return [part.strip() for part in config.OUTPUT_DIR.split(",") if part.strip()]


def run_models(dirs):
    """The base model of each run: --model's (one for all, or one per run) when given, else the one each run's
    results record (runs sharing it share one load)."""
    names = [part.strip() for part in config.MODEL_NAME.split(",") if part.strip()]
    if len(names) not in (1, len(dirs)):
        raise InputError(f"--model {config.MODEL_NAME}: give one model, or one per --output-dir ({len(dirs)} runs)")
    if "MODEL_NAME" in config.GIVEN or len(dirs) == 1:
        return names * len(dirs) if len(names) == 1 else names
    return [recorded_model(run_dir) or config.MODEL_NAME for run_dir in dirs]


def recorded_model(run_dir):
    """The --model a run trained with, as its results record it ("" when none does)."""
    summary = os.path.join(run_dir, "summary")
    names = sorted(os.listdir(summary)) if os.path.isdir(summary) else []
    for name in names:
        if name.endswith("_results.json"):
            model = read_json(os.path.join(summary, name)).get("training_settings", {}).get("MODEL_NAME")
            if model:
                return model
    return ""


@contextlib.contextmanager
def in_run(run_dir, model=None):
    """config points at one run (its output dir and base model) inside."""
    saved = config.OUTPUT_DIR, config.MODEL_NAME
    config.update({"OUTPUT_DIR": run_dir, "MODEL_NAME": model or config.MODEL_NAME})
    try:
        yield
    finally:
        config.update({"OUTPUT_DIR": saved[0], "MODEL_NAME": saved[1]})


def grid(runs, step=GRID_STEP):
    """Weight vectors over the simplex in steps of `step`, the most even first (argmax keeps the first of ties)."""
    units = round(1 / step)
    vectors = [vector for vector in itertools.product(range(units + 1), repeat=runs) if sum(vector) == units]
    vectors.sort(key=lambda vector: (sum(v * v for v in vector), [-v for v in vector]))
    return np.array(vectors, dtype=float) / units


def blend_runs(weights, parts):
    """(labels, probabilities) of the runs' (labels, probabilities) at `weights`; a run at weight 0 is left out, so
    that its labels do not even fill a top 3."""
    return blend_probabilities([(weight, *part) for weight, part in zip(weights, parts) if weight > 0])


def seeds_path(run_dir):
    return os.path.join(run_dir, "summary", "seeds.json")


def seed_dirs(run_dir):
    """The runs of a seeds run (train.py --seeds): its own dir, then seed_<s>/ of each other seed; [run_dir] for a
    run of one seed."""
    if not os.path.isfile(seeds_path(run_dir)):
        return [run_dir]
    return [os.path.normpath(os.path.join(run_dir, name)) for name in read_json(seeds_path(run_dir))["runs"]]


def write_seeds_record(runs):
    """summary/seeds.json of --output-dir: the seeds and where their runs are (relative to it)."""
    write_json_atomic(seeds_path(config.OUTPUT_DIR), {
        "seeds": [seed for seed, _ in runs], "runs": [os.path.relpath(run_dir, config.OUTPUT_DIR) for _, run_dir in runs]})


def mean_oof(oofs):
    """{QuestionId: (table, labels, probabilities)}: the equal-weight mean of several runs' OOF over the rows they all
    have."""
    mean = {}
    for question_id in sorted(set.intersection(*(set(oof) for oof in oofs))):
        table = oofs[0][question_id][0]
        for oof in oofs[1:]:
            table = table.loc[table.index.intersection(oof[question_id][0].index, sort=False)]
        parts = [(1.0, labels, probs[part_table.index.get_indexer(table.index)])
                 for part_table, labels, probs in (oof[question_id] for oof in oofs)]
        mean[question_id] = (table, *blend_probabilities(parts))
    return mean


def score_seeds(df, runs):
    """Score each seed's run and their average out of fold, for each checkpoint, over the rows all seeds have; write
    them into summary/seeds.json and return it."""
    record = read_json(seeds_path(config.OUTPUT_DIR))
    for checkpoint in CHECKPOINTS:
        oofs = []
        for _, run_dir in runs:
            with in_run(run_dir):
                oofs.append(run_oof(df, checkpoint))
        if not all(oofs):
            continue
        vectors = np.vstack([np.eye(len(runs)), np.full(len(runs), 1 / len(runs))])
        scores, _, _ = score_grid(df, oofs, vectors)
        mean, interval = paired_difference(scores[-1] - scores[:-1].mean(axis=0))
        record[checkpoint] = {"rows": scores.shape[1], "seeds_map3": scores[:-1].mean(axis=1).tolist(),
                              "average_map3": float(scores[-1].mean()),
                              "average_minus_seeds": {"mean": mean, "interval": list(interval)}}
    write_json_atomic(seeds_path(config.OUTPUT_DIR), record)
    return record


def run_oofs(df, dirs, checkpoint):
    """Each run's {QuestionId: (fold and label by row_id, labels, probabilities)} (sources.run_oof; a seeds run's,
    the mean of its seeds')."""
    oofs = []
    for run_dir in dirs:
        seeds = []
        for seed_dir in seed_dirs(run_dir):
            with in_run(seed_dir):
                seeds.append(run_oof(df, checkpoint))
        oof = (mean_oof(seeds) if len(seeds) > 1 else seeds[0]) if all(seeds) else {}
        if not oof:
            raise InputError(f"--output-dir {run_dir}: no out-of-fold files (question_<id>/oof_{checkpoint}.csv, "
                             "global/) with training results (summary/); an ensemble fits its weights on them")
        oofs.append(oof)
    return oofs


def score_grid(df, oofs, vectors):
    """(per-row MAP@3 of each weight vector: vectors x rows, the rows' QuestionIds, their folds) over the rows every
    run has out of fold, the first run's folds."""
    correct = dict(zip(df["row_id"], correctness_of(df)))
    scores, questions, folds = [], [], []
    for question_id in sorted(set.intersection(*(set(oof) for oof in oofs))):
        rows = oofs[0][question_id][0].index
        for oof in oofs[1:]:
            rows = rows.intersection(oof[question_id][0].index, sort=False)
        if not len(rows):
            continue
        parts = []
        for oof in oofs:
            table, labels, probs = oof[question_id]
            parts.append((labels, probs[table.index.get_indexer(rows)]))
        truth = oofs[0][question_id][0].loc[rows, "label"].to_numpy()
        verdicts = [correct[row] for row in rows]
        scores.append([average_precisions(truth, decode_top_k(*blend_runs(vector, parts)[::-1], verdicts,
                                                              config.CORRECTNESS_MASK))
                       for vector in vectors])
        questions += [question_id] * len(rows)
        folds.append(oofs[0][question_id][0].loc[rows, "fold"].to_numpy())
    if not scores:
        raise InputError(f"--output-dir {config.OUTPUT_DIR}: the runs share no out-of-fold rows (other --train-data, "
                         "--questions or split?)")
    return np.concatenate(scores, axis=1), np.array(questions), np.concatenate(folds)


def best(scores, rows):
    """The index of the vector with the highest mean score over `rows` (a mask); ties: the first, the most even."""
    return int(np.argmax(scores[:, rows].mean(axis=1)))


def fit(scores, questions, folds, rows):
    """(index of the shared vector, {QuestionId: index of its own}) fitted on `rows`: a question keeps its own only
    where, fitted on the other folds, it scores its held-out rows above the shared vector fitted on them."""
    shared = best(scores, rows)
    own = {}
    for question_id in np.unique(questions[rows]):
        mine = rows & (questions == question_id)
        held_out = np.unique(folds[mine])
        if len(held_out) < 2:
            continue
        gain = 0.0
        for fold in held_out:
            fitting, scored = rows & (folds != fold), mine & (folds == fold)
            gain += scores[best(scores, fitting & mine), scored].sum() - scores[best(scores, fitting), scored].sum()
        if gain > 0:
            own[int(question_id)] = best(scores, mine)
    return shared, own


def alone(vectors, run):
    """The index of the grid vector that weighs run `run` alone."""
    return int(np.flatnonzero(vectors[:, run] == 1)[0])


def chosen_vectors(shared, own, questions):
    """Per row, the index of the vector its question uses: its own where it kept one, else the shared one."""
    return np.array([own.get(int(question_id), shared) for question_id in questions])


def cross_fold_scores(scores, questions, folds):
    """Per-row MAP@3 of the fitted ensemble, each fold's rows scored with the weights fitted on the other folds
    (the per-question check nested inside them)."""
    if len(np.unique(folds)) < 2:
        raise InputError("the runs' out-of-fold rows are one fold: scoring the ensemble honestly needs --folds K runs")
    honest = np.zeros(scores.shape[1])
    for fold in np.unique(folds):
        shared, own = fit(scores, questions, folds, folds != fold)
        for column in np.flatnonzero(folds == fold):
            honest[column] = scores[own.get(int(questions[column]), shared), column]
    return honest


def fit_record(df, dirs, checkpoint):
    """Fit the runs' weights on their out-of-fold files; the record ensemble.json holds."""
    vectors = grid(len(dirs))
    scores, questions, folds = score_grid(df, run_oofs(df, dirs, checkpoint), vectors)
    shared, own = fit(scores, questions, folds, np.ones(len(questions), dtype=bool))
    runs_alone = [alone(vectors, run) for run in range(len(dirs))]
    chosen = chosen_vectors(shared, own, questions)
    entries = {}
    for question_id in np.unique(questions):
        mine = questions == question_id
        vector = own.get(int(question_id), shared)
        entries[str(question_id)] = {"weights": vectors[vector].tolist(), "own": int(question_id) in own,
                                     "rows": int(mine.sum()), "map3": float(scores[vector, mine].mean()),
                                     "runs_map3": [float(scores[index, mine].mean()) for index in runs_alone]}
    return {"runs": dirs, "fitted": True, "checkpoint": checkpoint, "grid_step": GRID_STEP, "rows": len(questions),
            "weights": vectors[shared].tolist(), "questions": entries,
            "map3": float(scores[chosen, np.arange(len(questions))].mean()),
            "shared_map3": float(scores[shared].mean()),
            "runs_map3": [float(scores[index].mean()) for index in runs_alone]}


def fixed_record(dirs, weights):
    """The record of weights given on the command line (--ensemble-weights): nothing fitted."""
    if len(weights) != len(dirs) or any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise InputError(f"--ensemble-weights {','.join(map(str, weights))}: give one non-negative weight per "
                         f"--output-dir ({len(dirs)} runs), not all 0")
    return {"runs": dirs, "weights": [weight / sum(weights) for weight in weights], "questions": {}, "fitted": False}


def record_path():
    return os.path.join(os.path.dirname(os.path.abspath(config.SUBMISSION_PATH)), "ensemble.json")


def write_record(record):
    write_json_atomic(record_path(), record)


def weights_of(record, question_id):
    """The runs' weights for a question: its own where it kept one, else the shared vector."""
    return record["questions"].get(str(question_id), {}).get("weights", record["weights"])
