"""Which model predicts each question at submit time: its own, the global model, or a blend of the two.

After training, train.py scores for each question with both models the blends (1 - w) own + w global at the weights
GLOBAL_WEIGHTS on the question's out-of-fold rows (its validation rows with one split), for each checkpoint, and
writes the best w to summary/sources.json; submit.py uses it unless --global-weight is given. A stalled question
model is never chosen (w = 1). Choosing on the rows it is scored on flatters the choice: in a K-fold run each
fold's rows are also scored with the weight chosen on the other folds ("cross_fold"), the figure to trust.
"""
import os

import numpy as np
import pandas as pd

import config
from utils import (average_precisions, blend_probabilities, correctness_of, decode_top_k, paired_difference,
                   question_label_mask, read_json, read_question_results, write_json_atomic)

GLOBAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHECKPOINTS = ("best_map3", "best")


def sources_path():
    return os.path.join(config.get_summary_dir(), "sources.json")


def read_oof(path):
    return pd.read_csv(path, keep_default_na=False, dtype={"row_id": str}).set_index("row_id")


def oof_path(question_id, checkpoint):
    return os.path.join(config.get_question_output_dir(question_id), f"oof_{checkpoint}.csv")


def oof_parts(own, global_part):
    """{end: (labels, probabilities)} of a question's OOF tables over the rows of `own` (or, without it, of
    `global_part`): end 0.0 for its model, 1.0 for the global model."""
    table = own if own is not None else global_part
    return {end: (list(part.columns[2:]), part.loc[table.index, part.columns[2:]].to_numpy(float))
            for end, part in {0.0: own, 1.0: global_part}.items() if part is not None}


def blend_at(parts, weight):
    """(labels, probabilities) of (1 - w) own + w global, blended as submit.py blends (one part alone: itself)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    return blend_probabilities([(weight if end else 1 - weight, *part) for end, part in parts.items()])


def blend_scores(own, global_part, correct):
    """{w: per-row MAP@3 of (1 - w) own + w global, blended as submit.py blends} over the rows of a question's OOF
    table `own` (either may be None: then only the other's weight is scored)."""
    table = own if own is not None else global_part
    parts = oof_parts(own, global_part)
    scores = {}
    for weight in GLOBAL_WEIGHTS if len(parts) == 2 else list(parts):
        labels, blended = blend_at(parts, weight)
        ranked = decode_top_k(blended, labels, correct, config.CORRECTNESS_MASK)
        scores[weight] = average_precisions(table["label"].to_numpy(), ranked)
    return scores


def best_weight(scores, rows, candidates):
    """The weight of the highest mean score over `rows` (a boolean mask); ties go to the lower global weight."""
    return max(candidates, key=lambda weight: (scores[weight][rows].mean(), -weight))


def choose(scores, folds, stalled):
    """(chosen weight, per-row scores of each fold's rows with the weight chosen on the other folds, or None for one
    split). A stalled question model leaves the global model alone as a candidate."""
    candidates = [1.0] if stalled and 1.0 in scores else list(scores)
    weight = best_weight(scores, np.ones(len(folds), dtype=bool), candidates)
    if len(set(folds)) < 2:
        return weight, None
    cross_fold = np.zeros(len(folds))
    for fold in set(folds):
        scored = folds == fold
        cross_fold[scored] = scores[best_weight(scores, ~scored, candidates)][scored]
    return weight, cross_fold


def global_part(global_table, question_id, question_rows, question_classes):
    """The global model's OOF rows of one question, over that question's labels; None where it has not all of them."""
    if global_table is None or str(question_id) not in question_classes or not set(question_rows) <= set(global_table.index):
        return None
    own = question_label_mask([question_id], global_table.columns[2:], question_classes)[0]
    return global_table.loc[list(question_rows), ["fold", "label", *global_table.columns[2:][own]]]


def question_tables(df, question_id, checkpoint, results, global_table):
    """(its model's OOF table or None, the global model's over the same rows or None) of one question."""
    own = read_oof(oof_path(question_id, checkpoint)) if (results.get(question_id, {}).get("status") == "succeeded" and
                                                          os.path.isfile(oof_path(question_id, checkpoint))) else None
    if own is not None:
        rows = own.index
    else:  # the question's rows the global model validated: all of them out of fold, some with one split
        rows = [] if global_table is None else global_table.index.intersection(df.loc[df["QuestionId"] == question_id, "row_id"])
    question_classes = (results.get(config.GLOBAL) or {}).get("question_classes", {})
    return own, global_part(global_table, question_id, rows, question_classes) if len(rows) else None


def global_table_of(results, checkpoint):
    """The global model's OOF table, None without a usable global model."""
    path = oof_path(config.GLOBAL, checkpoint)
    usable = results.get(config.GLOBAL, {}).get("status") == "succeeded" and os.path.isfile(path)
    return read_oof(path) if usable else None


def run_oof(df, checkpoint):
    """{QuestionId: (OOF table: fold and label by row_id, labels, probabilities)} of the run in --output-dir: each
    question's out-of-fold probabilities as submit.py blends them (its model and the global model at the weight
    global_weight gives)."""
    results = read_question_results([*config.QUESTION_IDS, config.GLOBAL])
    global_table = global_table_of(results, checkpoint)
    chosen = chosen_weights(checkpoint)
    tables = {}
    for question_id in config.QUESTION_IDS:
        own, from_global = question_tables(df, question_id, checkpoint, results, global_table)
        if own is None and from_global is None:
            continue
        table = own if own is not None else from_global
        tables[question_id] = (table[["fold", "label"]], *blend_at(oof_parts(own, from_global),
                                                                   global_weight(question_id, chosen)))
    return tables


def question_sources(df, checkpoint, results, global_table):
    """({QuestionId: entry}, {figure: per-row scores over every question}) for one checkpoint; the figures are
    chosen (each question's chosen weight), fixed (--global-weight for all) and cross_fold."""
    correct = dict(zip(df["row_id"], correctness_of(df)))
    entries, figures = {}, {"chosen": [], "fixed": [], "cross_fold": []}
    for question_id in config.QUESTION_IDS:
        result = results.get(question_id, {})
        own, from_global = question_tables(df, question_id, checkpoint, results, global_table)
        if own is None and from_global is None:
            continue
        table = own if own is not None else from_global
        scores = blend_scores(own, from_global, [correct[row] for row in table.index])
        stalled = bool(result.get("stalled"))
        weight, cross_fold = choose(scores, table["fold"].to_numpy(), stalled)
        fixed = config.GLOBAL_WEIGHT if config.GLOBAL_WEIGHT in scores else weight
        entries[question_id] = {"global_weight": weight, "rows": len(table), "stalled": stalled,
                                "map3": {f"{w:g}": float(s.mean()) for w, s in scores.items()},
                                "cross_fold_map3": None if cross_fold is None else float(cross_fold.mean())}
        figures["chosen"].append(scores[weight])
        figures["fixed"].append(scores[fixed])
        figures["cross_fold"].append(scores[weight] if cross_fold is None else cross_fold)
    return entries, {figure: np.concatenate(parts) if parts else np.zeros(0) for figure, parts in figures.items()}


def choose_sources(df):
    """Choose and record each question's source for every checkpoint (summary/sources.json); returns the record."""
    results = read_question_results([*config.QUESTION_IDS, config.GLOBAL])
    record = {"weights": list(GLOBAL_WEIGHTS), "default_global_weight": config.GLOBAL_WEIGHT}
    for checkpoint in CHECKPOINTS:
        entries, figures = question_sources(df, checkpoint, results, global_table_of(results, checkpoint))
        if not entries:
            continue
        overall = {f"{figure}_map3": float(scores.mean()) for figure, scores in figures.items()}
        overall["rows"] = len(figures["chosen"])
        for figure in ("chosen", "cross_fold"):
            mean, interval = paired_difference(figures[figure] - figures["fixed"])
            overall[f"{figure}_minus_fixed"] = {"mean": mean, "interval": list(interval)}
        record[checkpoint] = {"questions": {str(q): entry for q, entry in entries.items()}, "overall": overall}
    write_json_atomic(sources_path(), record)
    return record


def chosen_weights(checkpoint):
    """{QuestionId: the global weight train.py chose} for a checkpoint, {} without a record."""
    path = sources_path()
    if not os.path.isfile(path):
        return {}
    entries = read_json(path).get(checkpoint, {}).get("questions", {})
    return {int(question_id): entry["global_weight"] for question_id, entry in entries.items()}


def global_weight(question_id, chosen):
    """The global model's weight in a question's blend: --global-weight when given, else the one train.py chose for
    the question out of fold (`chosen`), else --global-weight's default."""
    if "GLOBAL_WEIGHT" in config.GIVEN:
        return config.GLOBAL_WEIGHT
    return chosen.get(question_id, config.GLOBAL_WEIGHT)
