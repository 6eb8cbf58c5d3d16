"""Train the stages of a recipe: by default a global model, then one LoRA sequence classifier per QuestionId from it.

A recipe (recipes/*.py, default recipes/qwen3_0.6b.py) lists the stages; each trains either one model over the
rows of all selected questions (--scope global) or one per question (--scope question, started from the global
model of the same run). For each model: its rows, its own label encoder, a stratified train/validation split
(or K folds), LoRA fine-tuning with evaluation by MAP@3, `best_map3/` (best validation MAP@3) and `best/` (final
model), and a stall test against the label prior; one model's fine-tuning, with the checkpoints from which a
stopped model goes on, is fine_tune.py. The base model is loaded once per process and each model's
LoRA layers are removed after it, so start-up is paid once. Questions are independent: with several GPUs one
worker process per GPU takes them from a shared queue, longest first, and `--shard K/N` splits them over machines
(placement.py).
After training, each question's source for submit.py is chosen out of fold (sources.py). With --refit, each K-fold
model is then trained once more on all its rows (refit/best), for the epochs its folds chose.

    python train.py [RECIPE.py] --train-data train.csv --model /path/to/Qwen3-0.6B --output-dir ver_2
"""
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
import traceback
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import config
import ensemble
import placement
import ranks
import report
from fine_tune import MapTrainer, ModelData, input_changes, train_fold
from sources import choose_sources, sources_path
from prompts import GLOBAL_PROMPT_VERSION, encode_prompts
from utils import (TARGET_COLUMN, InputError, adaptable_layers, allowed_classes, average_precisions, correctness_of,
                   decode_top_k, fit_label_encoder, full_labels, load_backbone, log, map_at_k,
                   read_competition_csv, read_json, read_question_results, resolve_precision, setup_logging,
                   training_targets, unmatched_lora_targets, write_json_atomic)
# The settings that change what training produces: each result records them, and a question whose recorded
# training settings differ from the current ones is retrained.
TRAINING_SETTINGS = [
    "MODEL_NAME", "PROMPT_VERSION", "MAX_LEN", "EPOCHS", "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS",
    "LEARNING_RATE", "WEIGHT_DECAY", "WARMUP_RATIO", "LR_SCHEDULER", "LABEL_SMOOTHING", "CLASS_WEIGHT_POWER",
    "DUPLICATES", "VAL_FRACTION", "FOLDS", "SEED", "EVAL_STEPS", "PRECISION", "LORA_RANK", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_TARGET_MODULES", "CORRECTNESS_MASK", "SCOPE", "LABEL_SPACE", "HEAD_LR_MULTIPLIER",
    "HEAD_INIT", "MAX_GRAD_NORM",
]
# Besides these, a result records the hash of its rows (another --train-data or --questions retrains it) and of the
# global model it started from (--init-from: a global model retrained since retrains it), not their paths.
# --val-fraction is held out as m of K folds, m/K its nearest fraction with K at most this.
MAX_VAL_FOLDS = 20
LIBRARIES = ["torch", "transformers", "peft", "scikit-learn"]


def text_groups(rows):
    """One key per distinct (question, answer, explanation) text; rows that repeat a text share it."""
    return (rows["QuestionId"].astype(str) + "\x00" + rows["MC_Answer"] + "\x00"
            + rows["StudentExplanation"].str.strip().str.lower()).to_numpy()


def rows_hash(rows):
    """A short hash of the rows a model trains on: ids, question, answer, explanation and label."""
    columns = rows[["row_id", "QuestionId", "MC_Answer", "StudentExplanation", TARGET_COLUMN]].astype(str)
    return hashlib.sha1(pd.util.hash_pandas_object(columns, index=False).to_numpy().tobytes()).hexdigest()[:16]


def model_rows(df, question_id):
    """The rows one model trains on: a question's, or those of every selected question (GLOBAL)."""
    if question_id == config.GLOBAL:
        return df[df["QuestionId"].isin(config.QUESTION_IDS)].reset_index(drop=True)
    return df[df["QuestionId"] == question_id].reset_index(drop=True)


def results_hash(result):
    """A short hash of results as write_json_atomic writes them: for results read back, that of their file's bytes."""
    return hashlib.sha1(json.dumps(result, indent=2, sort_keys=True).encode()).hexdigest()[:16]


def init_from_hash(refit_model=False):
    """The hash of the --init-from global model's results (written anew whenever it trains); None without one.
    Question models started from its folds leave its refit record out, so that adding --refit to the run leaves them
    complete; refit models, started from its refit model, keep it."""
    if not config.INIT_FROM:
        return None
    result = read_json(global_run(config.INIT_FROM)[1])
    if not refit_model:
        result.pop("refit", None)
    return results_hash(result)


def resolve_duplicates(groups, labels, policy):
    """(labels to train on, rows to train on) after `policy` for texts repeated with different labels."""
    labels = labels.copy()
    keep = np.ones(len(labels), dtype=bool)
    if policy == "keep":
        return labels, keep
    table = pd.DataFrame({"group": groups, "label": labels})
    conflicting = table[table.groupby("group")["label"].transform("nunique") > 1]
    for _, members in conflicting.groupby("group")["label"]:
        counts = members.value_counts()
        if policy == "majority" and counts.iloc[0] > counts.iloc[1]:
            labels[members.index] = counts.index[0]
        else:
            keep[members.index] = False
    return labels, keep


def fold_splits(rows, folds, seed):
    """[(train indices, validation indices)] per fold: stratified by label, repeated texts on one side.

    folds=1 holds out VAL_FRACTION of the rows once, as m of K stratified group folds with m/K = VAL_FRACTION
    (K <= 20); there, the texts of a class with a single row stay in training, every row repeating them too.
    """
    if folds > 1:
        n_splits, held_out = folds, 1
    else:
        fraction = Fraction(config.VAL_FRACTION).limit_denominator(MAX_VAL_FOLDS)
        n_splits, held_out = fraction.denominator, fraction.numerator
    labels = rows[TARGET_COLUMN].to_numpy()
    groups = text_groups(rows)
    if len(set(groups)) < n_splits:
        raise InputError(f"question {rows['QuestionId'].iloc[0]}: {len(set(groups))} distinct texts, too few for {n_splits} folds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(rows)), labels, groups))
    if folds > 1:
        return splits
    val_idx = np.sort(np.concatenate([val for _, val in splits[:held_out]]))
    counts = rows[TARGET_COLUMN].value_counts()
    singleton_groups = set(groups[np.isin(labels, counts[counts < 2].index)])
    to_train = np.isin(groups[val_idx], list(singleton_groups))
    train_idx = np.setdiff1d(np.arange(len(rows)), val_idx[~to_train])
    return [(train_idx, val_idx[~to_train])]


def label_prior_scores(data, splits):
    """Per row, the MAP@3 of ranking its question's labels by their training frequency (NaN for rows never
    validated): what a model must beat."""
    scores = np.full(len(data.rows), np.nan)
    question_of = data.rows["QuestionId"].to_numpy()
    for train_idx, val_idx in splits:
        for question_id in np.unique(question_of[val_idx]):
            train_rows = train_idx[question_of[train_idx] == question_id]
            val_rows = val_idx[question_of[val_idx] == question_id]
            counts = np.bincount(data.train_labels[train_rows], minlength=len(data.classes))
            labels, probs = data.probabilities(np.tile(np.log(counts + 1e-9), (len(val_rows), 1)), val_rows)
            ranked = decode_top_k(probs, labels, [data.correct[i] for i in val_rows], config.CORRECTNESS_MASK,
                                  allowed=data.label_mask(val_rows, labels))
            scores[val_rows] = average_precisions(data.rows[TARGET_COLUMN].to_numpy()[val_rows], ranked)
    return scores


def model_splits(rows, folds, seed):
    """fold_splits of each question, united fold by fold (indices into `rows`).

    A global model's fold k holds exactly the rows of each question's own fold k, so the out-of-fold files of
    both scopes line up row by row.
    """
    per_question = []
    for _, index in sorted(rows.groupby("QuestionId").indices.items()):
        splits = fold_splits(rows.iloc[index].reset_index(drop=True), folds, seed)
        per_question.append([(index[train_idx], index[val_idx]) for train_idx, val_idx in splits])
    return [tuple(np.sort(np.concatenate([splits[k][side] for splits in per_question])) for side in (0, 1))
            for k in range(len(per_question[0]))]


def write_oof(question_id, data, labels, folds, probs_by_checkpoint, scored):
    """Save the probabilities (over full labels) of the validated rows `scored` per checkpoint: every row out of
    fold in a K-fold run, the validation rows of one split; return their MAP@3 (masked and not)."""
    scores = {}
    truth = data.rows[TARGET_COLUMN].to_numpy()[scored]
    correct = [data.correct[i] for i in scored]
    label_mask = data.label_mask(scored, labels)
    for checkpoint, probs in probs_by_checkpoint.items():
        table = pd.DataFrame(probs[scored], columns=labels)
        table.insert(0, "row_id", data.rows["row_id"].to_numpy()[scored])
        table.insert(1, "fold", folds[scored])
        table.insert(2, "label", truth)
        table.to_csv(os.path.join(config.get_question_output_dir(question_id), f"oof_{checkpoint}.csv"), index=False)
        for mask in (True, False):
            key = f"{checkpoint}_oof_map3" + ("" if mask else "_unmasked")
            scores[key] = map_at_k(truth, decode_top_k(probs[scored], labels, correct, mask, allowed=label_mask))
    return scores


def map3_by_question(data, labels, probs, index):
    """MAP@3 of the rows `index` per QuestionId (a global model's figures, question by question)."""
    rows = data.rows.iloc[index]
    ranked = decode_top_k(probs, labels, [data.correct[i] for i in index], config.CORRECTNESS_MASK,
                          allowed=data.label_mask(index, labels))
    scores = {}
    for question_id, positions in rows.groupby("QuestionId").indices.items():
        scores[str(question_id)] = map_at_k(rows[TARGET_COLUMN].to_numpy()[positions], [ranked[p] for p in positions])
    return scores


def global_run(init_dir):
    """(global/ dir, its results JSON path) of --init-from, given as an output dir or its global/ dir."""
    root = os.path.normpath(init_dir)
    if os.path.basename(root) != config.GLOBAL:
        root = os.path.join(root, config.GLOBAL)
    return root, os.path.join(os.path.dirname(root), "summary", "global_results.json")


def check_lora_targets():
    """InputError unless every --lora-targets name is a layer of --model (checked before any question is retrained:
    peft fails every question on no match, and trains a partial match without a word)."""
    layers = adaptable_layers(config.MODEL_NAME)
    unmatched = unmatched_lora_targets(layers, config.LORA_TARGET_MODULES)
    if unmatched:
        linear = sorted({name.split(".")[-1] for name, layer in layers.items() if isinstance(layer, torch.nn.Linear)})
        raise InputError(f"--lora-targets: {', '.join(unmatched)} not in {config.MODEL_NAME} "
                         f"(its linear layers: {', '.join(linear)})")


def init_from_result(init_dir, df=None, question_ids=()):
    """The results of the --init-from global model; InputError unless it trained with this run's folds, seed,
    label space, validation fraction (one split), with --refit a refit model, and, for each of `question_ids`, the
    same rows of `df` (checked before any question is retrained: otherwise its validation rows may be rows the
    global model trained on)."""
    _, results_path = global_run(init_dir)
    if not os.path.isfile(results_path):
        raise InputError(f"--init-from {init_dir}: no summary/global_results.json (train it with --scope global)")
    result = read_json(results_path)
    if result.get("status") != "succeeded":
        raise InputError(f"--init-from {init_dir}: the global model did not train ({result.get('status')})")
    recorded = result.get("training_settings", {})
    checked = ["FOLDS", "SEED", "LABEL_SPACE"] + (["VAL_FRACTION"] if config.FOLDS == 1 else [])
    for name in checked:
        if recorded.get(name) != getattr(config, name):
            flag = config.SETTINGS[name].flag
            raise InputError(f"--init-from {init_dir}: the global model has {flag} {recorded.get(name)}, this run "
                             f"{getattr(config, name)} (give {flag} {recorded.get(name)})")
    if config.REFIT and result.get("refit", {}).get("status") != "succeeded":
        raise InputError(f"--init-from {init_dir}: the global model has no refit model, which --refit starts the "
                         f"questions' refit models from (train it with --refit)")
    trained_on = result.get("question_rows_hash", {})
    for question_id in question_ids:
        if question_id != config.GLOBAL and trained_on.get(str(question_id)) != rows_hash(model_rows(df, question_id)):
            raise InputError(f"--init-from {init_dir}: question {question_id}: its rows in {config.TRAIN_DATA_PATH} are not "
                             f"those the global model trained on (retrain it with this --train-data and --questions)")
    return result


def global_start(init_dir, question_id, classes, fold):
    """(adapter dir, head rows) of the --init-from global model for one question and fold (config.REFIT_MODEL: its
    refit model); InputError if unusable."""
    result = init_from_result(init_dir)
    missing = [label for label in classes if label not in result["classes"]]
    if missing:
        raise InputError(f"--init-from {init_dir}: question {question_id}: labels {missing[:3]} unknown to the global model")
    root = global_run(init_dir)[0]
    folder = root if fold is None else os.path.join(root, config.member_name(fold))
    return os.path.join(folder, "best"), [result["classes"].index(label) for label in classes]


def model_data(rows, targets, classes, tokenizer, question_classes=None):
    """(ModelData of `rows` with their training `targets` over `classes`, prompt statistics); `question_classes`
    restricts each row to its question's labels (the global model)."""
    labels = np.searchsorted(classes, targets.to_numpy())
    train_labels, trainable = resolve_duplicates(text_groups(rows), labels, config.DUPLICATES)
    input_ids, prompt_stats = encode_prompts(rows, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    allowed = None if question_classes is None else allowed_classes(rows["QuestionId"], classes, question_classes)
    return ModelData(rows, input_ids, classes, labels, train_labels, trainable, correctness_of(rows), allowed,
                     question_classes), prompt_stats


def train_question(question_id, rows, backbone):
    """Train one model (a question's, or the global one over `rows`), one split or K folds; return its results.

    A K-fold model keeps each finished fold (fold_<k>/finished/: its results and validation probabilities) until the
    model is complete, its refit model included (--refit), so a run stopped in fold k goes on with fold k, from its
    last checkpoint (fine_tune.py).
    """
    targets = training_targets(rows, config.LABEL_SPACE)
    encoder = ranks.main_decides(lambda: fit_label_encoder(targets, config.get_question_label_encoder_path(question_id)))
    classes = list(encoder.classes_)
    result = {"question_id": question_id, "classes": classes, "num_classes": len(classes), "folds": config.FOLDS,
              "label_counts": rows[TARGET_COLUMN].value_counts().to_dict(), "rows": len(rows),
              "label_space": config.LABEL_SPACE, "seed": config.SEED, "scope": config.SCOPE}
    if len(classes) <= 1:
        message = f"Warning: Question {question_id} has only {len(classes)} class(es). Skipping..."
        tqdm.write(message)  # print, without breaking a progress bar
        return {**result, "status": "skipped", "reason": message}
    remove_stale_refit(question_id)

    question_classes = None
    if question_id == config.GLOBAL:
        question_classes = {str(q): sorted(set(group)) for q, group in targets.groupby(rows["QuestionId"])}
        result["question_classes"] = question_classes
        # What --init-from checks: a question model may start from this one only on the same rows.
        result["question_rows_hash"] = {str(q): rows_hash(part) for q, part in rows.groupby("QuestionId")}
    data, prompt_stats = model_data(rows, targets, classes, backbone.tokenizer, question_classes)
    splits = model_splits(rows, config.FOLDS, config.SEED)
    log.info("%s: %d rows, %d classes, %s; prompt tokens mean %.0f p95 %.0f max %d, context shortened in %d rows",
             report.model_name(question_id), len(rows), len(classes),
             f"{len(splits[0][0])} train / {len(splits[0][1])} val" if config.FOLDS == 1 else f"{config.FOLDS} folds",
             prompt_stats["mean_tokens"], prompt_stats["p95_tokens"], prompt_stats["max_tokens"], prompt_stats["shortened"])
    # Repeated texts never straddle a split, so resolving them over all rows equals resolving each training side.
    splits = [(train_idx[data.trainable[train_idx]], val_idx) for train_idx, val_idx in splits]
    prior_scores = label_prior_scores(data, splits)
    result["prior_map3"] = float(np.nanmean(prior_scores))
    folds = [None] if config.FOLDS == 1 else list(range(config.FOLDS))
    starts = [global_start(config.INIT_FROM, question_id, classes, fold) if config.INIT_FROM else None for fold in folds]
    if config.INIT_FROM:
        result["init_from"] = [start[0] for start in starts]

    fold_of_row = np.zeros(len(rows), dtype=int)
    labels = full_labels(classes)
    oof = {checkpoint: np.zeros((len(rows), len(labels))) for checkpoint in ("best_map3", "best")}
    fold_results = []
    inputs = model_inputs(rows)
    for fold, (train_idx, val_idx), start in zip(folds, splits, starts):
        finished = None if fold is None or config.OVERWRITE else \
            ranks.main_decides(lambda: finished_fold(question_id, fold, rows))
        if finished:
            fold_result, probs = finished
            log.info("%s fold %d: finished in an earlier run, kept", report.model_name(question_id), fold)
        else:
            fold_result, probs = train_fold(question_id, fold, data, train_idx, val_idx, backbone, inputs, start)
            if fold is not None and ranks.is_main():
                save_finished_fold(question_id, fold, rows, fold_result, probs)
        fold_results.append(fold_result)
        fold_of_row[val_idx] = fold or 0
        for checkpoint in oof:
            oof[checkpoint][val_idx] = probs[checkpoint]
        if fold is not None:
            log.info("%s fold %d: best MAP@3 %.4f, final %.4f", question_id, fold, fold_result["best_map3"], fold_result["final_map3"])
    result.update(status="succeeded", prompt_stats=prompt_stats)
    scored = np.sort(np.concatenate([val_idx for _, val_idx in splits]))
    if question_id == config.GLOBAL:
        result["per_question_final_map3"] = map3_by_question(data, labels, oof["best"][scored], scored)
    scores = ranks.main_decides(lambda: write_oof(question_id, data, labels, fold_of_row, oof, scored))
    final_ranked = decode_top_k(oof["best"][scored], labels, [data.correct[i] for i in scored], config.CORRECTNESS_MASK,
                                allowed=data.label_mask(scored, labels))
    result.update(stall_test(average_precisions(data.rows[TARGET_COLUMN].to_numpy()[scored], final_ranked),
                             prior_scores[scored]))
    if config.FOLDS == 1:
        return {**result, **fold_results[0]}
    if config.REFIT:
        result["refit"] = train_refit(question_id, rows, data, fold_results, backbone)
    for fold in folds:
        if ranks.is_main():
            shutil.rmtree(finished_fold_dir(question_id, fold), ignore_errors=True)
    return {
        **result, "fold_results": fold_results,
        # Over every row, each predicted by the fold model that did not see it.
        "best_map3": scores["best_map3_oof_map3"], "best_map3_unmasked": scores["best_map3_oof_map3_unmasked"],
        "final_map3": scores["best_oof_map3"], "final_map3_unmasked": scores["best_oof_map3_unmasked"],
        "initial_map3": float(np.mean([r["initial_map3"] for r in fold_results])),
        "nonfinite_steps": sum(r.get("nonfinite_steps", 0) for r in fold_results),
        "train_rows": len(rows), "val_rows": len(rows),
    }


def remove_stale_refit(question_id):
    """A model trained anew makes its refit adapter (refit/best) a model of earlier inputs that no results name: it
    goes, rather than weigh down an upload of the run (--refit trains a new one after the folds)."""
    stale = config.get_question_model_path(question_id, "best", config.REFIT_MODEL)
    if ranks.is_main() and os.path.isdir(stale):
        log.info("%s: removing %s, the refit model of earlier inputs", report.model_name(question_id), stale)
        shutil.rmtree(stale)


def train_refit(question_id, rows, data, fold_results, backbone):
    """Train a K-fold model's refit model (refit/best) on all its training rows (those --duplicates keeps), without
    validation, for the epochs its folds chose: the mean over the folds of the step of their best_map3 as a fraction
    of their steps, times --epochs. A question model's starts from the global model's refit model. Returns its record
    for the results."""
    started = time.time()
    epochs = config.EPOCHS * float(np.mean([fold["best_step"] / fold["steps"] for fold in fold_results]))
    train_idx = np.flatnonzero(data.trainable)
    start = global_start(config.INIT_FROM, question_id, data.classes, config.REFIT_MODEL) if config.INIT_FROM else None
    trained, _ = train_fold(question_id, config.REFIT_MODEL, data, train_idx, np.array([], dtype=int), backbone,
                            model_inputs(rows), start, epochs)
    record = {"status": "succeeded", "epochs": epochs, "steps": trained["steps"], "train_rows": len(train_idx),
              "nonfinite_steps": trained["nonfinite_steps"], "seconds": round(time.time() - started, 2)}
    if start:
        # The global model's whole results, refit record included: another global refit model retrains this one.
        record.update(init_from=start[0], init_from_hash=init_from_hash(refit_model=True))
    return record


def refit_of_completed(question_id, rows, backbone, result):
    """The refit record of a K-fold model whose folds an earlier run completed (its results `result`)."""
    data, _ = model_data(rows, training_targets(rows, config.LABEL_SPACE), result["classes"], backbone.tokenizer,
                         result.get("question_classes"))
    return train_refit(question_id, rows, data, result["fold_results"], backbone)


def finished_fold_dir(question_id, fold):
    return os.path.join(config.get_question_output_dir(question_id), f"fold_{fold}", "finished")


def save_finished_fold(question_id, fold, rows, fold_result, probs):
    """Keep a finished fold of a K-fold model: its results, its validation probabilities and what it was made from."""
    folder = finished_fold_dir(question_id, fold)
    staging = folder + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    np.savez(os.path.join(staging, "probabilities.npz"), **probs)
    write_json_atomic(os.path.join(staging, "fold.json"), {**model_inputs(rows), "result": fold_result})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def finished_fold(question_id, fold, rows):
    """(fold results, validation probabilities) of a fold an earlier run finished with the same inputs, else None."""
    folder = finished_fold_dir(question_id, fold)
    adapters = [config.get_question_model_path(question_id, checkpoint, fold) for checkpoint in ("best", "best_map3")]
    if not (os.path.isfile(os.path.join(folder, "fold.json"))
            and all(os.path.isfile(os.path.join(path, "adapter_config.json")) for path in adapters)):
        return None
    recorded = read_json(os.path.join(folder, "fold.json"))
    changed = changed_inputs(recorded, rows)
    if changed:
        log.info("%s fold %d: finished with other inputs (%s), retraining", report.model_name(question_id), fold,
                 ", ".join(changed))
        return None
    with np.load(os.path.join(folder, "probabilities.npz")) as stored:
        return recorded["result"], {name: stored[name] for name in stored.files}


# A model is stalled when its lead over the label prior on the validation rows is within this many standard errors
# of the paired per-row difference: about a 2.5% chance that a model no better than the prior leads by more.
STALL_STANDARD_ERRORS = 2.0


def stall_test(model_scores, prior_scores):
    """{lead_over_prior, stall_margin, stalled}: the model's MAP@3 minus the label prior's on the same rows, and
    whether that lead is within STALL_STANDARD_ERRORS of noise at this many rows."""
    differences = np.asarray(model_scores) - np.asarray(prior_scores)
    margin = STALL_STANDARD_ERRORS * differences.std(ddof=1) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
    lead = float(differences.mean())
    return {"lead_over_prior": lead, "stall_margin": float(margin), "stalled": bool(lead <= margin)}


def training_settings():
    """The current TRAINING_SETTINGS as they read back from a results JSON."""
    return json.loads(json.dumps({name: getattr(config, name) for name in TRAINING_SETTINGS}))


def model_inputs(rows):
    """What makes a model what it is, as its results record it: training settings, rows, starting model, model seed
    and the processes that train it together (torchrun)."""
    return {"training_settings": training_settings(), "rows_hash": rows_hash(rows), "init_from_hash": init_from_hash(),
            "model_seed": config.model_seed(), "processes": ranks.world_size()}


def changed_inputs(recorded, rows):
    """Why a model recorded with `recorded` (a result, or a finished fold) is not this run's: [] when it is."""
    return input_changes(recorded, model_inputs(rows))


def completed_folds(question_id, rows):
    """The results of a model an earlier run completed, else None: trained with the current training settings, on
    these rows, from the same starting model and, for a trained question, both adapters of each fold on disk. Its
    refit model is refit_wanted's matter."""
    path = config.get_question_results_path(question_id)
    if not os.path.isfile(path):
        return None
    result = read_json(path)
    if result["status"] not in ("succeeded", "skipped"):
        return None
    changed = changed_inputs(result, rows)
    if changed:
        log.info("%s: trained with other inputs (%s), retraining", report.model_name(question_id), ", ".join(changed))
        return None
    folds = [None] if result.get("folds", 1) == 1 else range(result["folds"])
    adapters = all(os.path.isfile(os.path.join(config.get_question_model_path(question_id, checkpoint, fold), "adapter_config.json"))
                   for checkpoint in ("best", "best_map3") for fold in folds)
    return result if result["status"] == "skipped" or adapters else None


def refit_wanted(question_id, result):
    """Whether --refit asks for a refit model that a completed model's results `result` lack: a K-fold model without
    a succeeded one, without its adapter on disk, or started from a global refit model that has changed since."""
    if not (config.REFIT and result["status"] == "succeeded" and result.get("folds", 1) > 1):
        return False
    refit = result.get("refit", {})
    adapter = os.path.join(config.get_question_model_path(question_id, "best", config.REFIT_MODEL), "adapter_config.json")
    same_start = refit.get("init_from_hash") == init_from_hash(refit_model=True)
    return not (refit.get("status") == "succeeded" and os.path.isfile(adapter) and same_start)


def is_complete(question_id, rows):
    """Whether a model needs no training: completed_folds, and with --refit its refit model too."""
    result = completed_folds(question_id, rows)
    return result is not None and not refit_wanted(question_id, result)


def peak_memory_mb(device):
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    return {"peak_rss_mb": rss_kb / 1024, "peak_gpu_memory_mb": gpu}


def run_question(question_id, rows, backbone, completed=None):
    """Train one question (or the global model) with its own log file; a failure is recorded, and the run goes on.

    `completed`: the results of a K-fold model an earlier run completed without the refit model --refit asks for.
    Only that trains, and the results change by their `refit` record alone (a failure recorded there), so question
    models started from this one keep their init_from_hash.

    Data-parallel, every rank trains it and rank 0 writes its results once all ranks have finished it; a failure is
    recorded and raised, ending this process, so that the launcher stops the others (which may be waiting on it).
    """
    # No results file while a question trains: a run killed midway leaves it to be retrained.
    if ranks.is_main() and completed is None and os.path.isfile(config.get_question_results_path(question_id)):
        os.remove(config.get_question_results_path(question_id))
    handler = setup_logging(os.path.join(config.get_question_log_dir(question_id), "train.log")) if ranks.is_main() else None
    wandb_run = None
    started = time.time()
    device = backbone.device
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    raised = None
    try:
        if config.USE_WANDB and ranks.is_main():
            import wandb
            wandb_run = wandb.init(project=config.WANDB_PROJECT, group=os.path.basename(os.path.abspath(config.OUTPUT_DIR)),
                                   name=os.path.basename(config.get_question_output_dir(question_id)), config=config.snapshot())
        if completed is None:
            result = train_question(question_id, rows, backbone)
        else:
            result = {**completed, "refit": refit_of_completed(question_id, rows, backbone, completed)}
    except Exception as error:
        log.error("%s failed%s:\n%s", report.model_name(question_id) + ("" if completed is None else " refit"),
                  f" on rank {ranks.rank()}" if ranks.is_distributed() else "", traceback.format_exc())
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        result = {"question_id": question_id, **failure} if completed is None else {**completed, "refit": failure}
        raised = error if ranks.is_distributed() else None
    finally:
        if wandb_run is not None:
            wandb_run.finish()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if completed is None:
        result.update(seconds=round(time.time() - started, 2), prompt_version=config.PROMPT_VERSION, max_len=config.MAX_LEN,
                      device=str(device), recipe=config.RECIPE, **model_inputs(rows),
                      versions={library: importlib.metadata.version(library) for library in LIBRARIES},
                      **peak_memory_mb(device))
    if raised is None:
        ranks.barrier()  # the model is complete only once every rank has finished it
    if ranks.is_main():
        write_json_atomic(config.get_question_results_path(question_id), result)
    if raised is not None:
        raise raised
    return result


def write_summary(question_ids):
    """Merge the question results on disk into all_questions_summary.json and the summary pictures."""
    results = read_question_results(question_ids)
    succeeded = [r for r in results.values() if r["status"] == "succeeded"]
    val_rows = sum(r["val_rows"] for r in succeeded)
    with_prior = [r for r in succeeded if r.get("prior_map3") is not None]  # results written before it was recorded lack it
    prior_rows = sum(r["val_rows"] for r in with_prior)
    summary = {
        "questions": len(question_ids),
        "succeeded": len(succeeded),
        "failed": sum(r["status"] == "failed" for r in results.values()),
        "skipped": sum(r["status"] == "skipped" for r in results.values()),
        "missing": [q for q in question_ids if q not in results],
        "per_question": {str(q): {key: r.get(key) for key in ("status", "best_map3", "final_map3", "prior_map3", "stalled",
                                                              "lead_over_prior", "stall_margin", "rows", "num_classes",
                                                              "val_rows", "seconds", "error", "refit")}
                         for q, r in results.items()},
        # Row-weighted, so a question counts as much as its rows do in the competition's metric. The final
        # checkpoint's score is the estimate; best_map3 was selected on the same rows, so it is optimistic.
        "overall_best_map3": sum(r["best_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "overall_final_map3": sum(r["final_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "overall_prior_map3": sum(r["prior_map3"] * r["val_rows"] for r in with_prior) / prior_rows if prior_rows else None,
        "val_rows": val_rows,
        "seconds": round(sum(r.get("seconds", 0) for r in results.values()), 2),
        "training_settings": settings_groups(results),
    }
    global_result = read_question_results([config.GLOBAL]).get(config.GLOBAL)
    if global_result:
        summary["global"] = {key: global_result.get(key) for key in (
            "status", "best_map3", "final_map3", "prior_map3", "stalled", "val_rows", "seconds", "error",
            "per_question_final_map3", "refit")}
    if os.path.isfile(sources_path()):
        summary["sources"] = read_json(sources_path())
    if os.path.isfile(ensemble.seeds_path(config.OUTPUT_DIR)):
        summary["seeds"] = read_json(ensemble.seeds_path(config.OUTPUT_DIR))
    log_settings_groups(summary["training_settings"])
    write_json_atomic(os.path.join(config.get_summary_dir(), "all_questions_summary.json"), summary)
    report.plot_summary(results, summary, global_result)
    return summary


def models_to_fit(df, question_id):
    """Models that training this question (or GLOBAL) fits: none for a question with one class, else FOLDS, and its
    refit model (--refit)."""
    members = config.FOLDS + (1 if config.REFIT else 0)
    if question_id == config.GLOBAL:
        return members
    return members if df.loc[df["QuestionId"] == question_id, TARGET_COLUMN].nunique() > 1 else 0


def models_to_train(df, question_id):
    """Models a run fits for this question (or GLOBAL): none when its results are complete, its refit model alone
    when only that is missing, else models_to_fit."""
    if not config.OVERWRITE:
        completed = completed_folds(question_id, model_rows(df, question_id))
        if completed is not None:
            return int(refit_wanted(question_id, completed))
    return models_to_fit(df, question_id)


def settings_groups(results):
    """[{"settings": training settings, "questions": the questions trained with them}] over the results."""
    groups = []
    for question_id, result in results.items():
        settings = result.get("training_settings")
        group = next((group for group in groups if group["settings"] == settings), None)
        if group is None:
            groups.append({"settings": settings, "questions": [question_id]})
        else:
            group["questions"].append(question_id)
    return groups


def log_settings_groups(groups):
    """One line per group of results trained with the same settings; with several, only what differs."""
    names = [name for name in TRAINING_SETTINGS
             if len(groups) == 1 or len({json.dumps((group["settings"] or {}).get(name)) for group in groups}) > 1]
    for group in groups:
        settings = "no recorded settings" if group["settings"] is None else \
            ", ".join(f"{config.SETTINGS[name].flag} {group['settings'].get(name)}" for name in names)
        log.info("questions %s trained with %s", ",".join(map(str, group["questions"])), settings)


def train_questions(df, question_ids, device, progress):
    """Train questions (or GLOBAL) one after the other in this process (question_ids may be a queue's iterator)."""
    backbone = None
    MapTrainer.progress = progress
    for question_id in question_ids:
        rows = model_rows(df, question_id)
        completed = None if config.OVERWRITE else ranks.main_decides(lambda: completed_folds(question_id, rows))
        if completed is not None and not ranks.main_decides(lambda: refit_wanted(question_id, completed)):
            log.info("%s: results complete, skipping (use --overwrite to retrain)", report.model_name(question_id))
            continue
        models = models_to_fit(df, question_id) if completed is None else 1
        if backbone is None:
            backbone = load_backbone(config.MODEL_NAME, device)
        result = run_question(question_id, rows, backbone, completed)
        progress.question_done(models, report.question_line(result))


def train_queued(device, question_ids, progress):
    """A worker process's training (placement.worker): the questions of the shared queue, on its device."""
    train_questions(read_competition_csv(config.TRAIN_DATA_PATH, labelled=True), question_ids, device, progress)


def resolve_prompt_version():
    """--prompt-version, else the global model's prompt: for --scope global, and for --init-from (its adapter
    learned that prompt)."""
    if "PROMPT_VERSION" in config.GIVEN:
        return
    if config.INIT_FROM:
        results = global_run(config.INIT_FROM)[1]
        if os.path.isfile(results):
            config.update({"PROMPT_VERSION": read_json(results).get("prompt_version", GLOBAL_PROMPT_VERSION)})
    elif config.SCOPE == "global":
        config.update({"PROMPT_VERSION": GLOBAL_PROMPT_VERSION})


def run_stages():
    """The stages this run trains, each as the full settings: the recipe's STAGES over the run's settings, flags
    over both. --scope keeps the stages of that scope, --init-from the question stages; a question stage after a
    global stage of the same run starts from it (--init-from this output dir)."""
    stages = config.STAGES
    if "SCOPE" in config.GIVEN:
        stages = [stage for stage in stages if stage.get("SCOPE") == config.SCOPE] or [{}]
    if "INIT_FROM" in config.GIVEN:
        stages = [stage for stage in stages if stage.get("SCOPE") == "question"] or [{}]
    base = config.snapshot()
    settings, global_before = [], False
    for stage in stages:
        stage_settings = config.stage_settings(stage, base)
        if stage_settings["SCOPE"] == "question" and global_before and "INIT_FROM" not in config.GIVEN:
            stage_settings["INIT_FROM"] = stage_settings["OUTPUT_DIR"]
        global_before |= stage_settings["SCOPE"] == "global"
        settings.append(stage_settings)
    return settings


def train_stage(df, device=None):
    """Train the models of the current settings' stage; returns the QuestionIds (or GLOBAL) it trained.
    `device`: this process's, under a launcher (ranks.start)."""
    if config.REFIT and config.FOLDS == 1:
        raise InputError("--refit trains on all rows for the epochs the folds chose: it needs --folds K > 1")
    question_ids = placement.shard_questions(df, config.QUESTION_IDS, config.SHARD)
    resolve_prompt_version()
    if config.SCOPE == "global":
        if config.INIT_FROM:
            raise InputError("--init-from starts per-question models from a global one: use it with --scope question")
        question_ids = [config.GLOBAL] if config.SHARD == "1/1" else []
    elif config.INIT_FROM:
        init_from_result(config.INIT_FROM, df, question_ids)  # a mismatch stops here, before any question's results are replaced
    if not config.INIT_FROM:  # a started model keeps its global adapter's layers
        check_lora_targets()
    # Under a launcher, each process trains every model on its own device, data-parallel with the others.
    devices = [device] if device else (placement.training_devices()[:1] if config.SCOPE == "global"
                                        else placement.training_devices())
    for each in devices:  # a bad --precision stops here, not inside the workers
        resolve_precision(config.PRECISION, each)
    total = ranks.main_decides(lambda: sum(models_to_train(df, question_id) for question_id in question_ids))
    log.info("training %s (%d model%s) on %s", "the global model" if config.SCOPE == "global"
             else f"{len(question_ids)} questions" + (" from the global model" if config.INIT_FROM else ""),
             total, "" if total == 1 else "s",
             f"{ranks.world_size()} processes ({device} on rank 0)" if device else ", ".join(devices))
    # Bars on a terminal, for one process only: workers' bars would overwrite each other. Every GPU run
    # trains in a worker process pinned to its GPU, or in the launcher's processes.
    progress = report.RunProgress(total, bars=devices == ["cpu"] and ranks.is_main())
    with logging_redirect_tqdm():  # log lines printed above the bars, not through them
        if device or devices == ["cpu"]:
            train_questions(df, question_ids, devices[0], progress)
        else:
            placement.train_in_workers(train_queued, df, question_ids, devices, progress)
    progress.close()
    return question_ids


def failed_models(question_ids):
    """The models that failed, or whose refit model --refit asked for failed."""
    results = ranks.main_decides(lambda: read_question_results(question_ids))
    return [q for q in question_ids if results.get(q, {}).get("status") == "failed"
            or (config.REFIT and results.get(q, {}).get("refit", {}).get("status") == "failed")]


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], "train", argv, recipe=config.DEFAULT_RECIPE)
    setup_logging()
    failed = []
    try:
        ranks.check_launch(config.GIVEN)
        device = ranks.start()
        if not ranks.is_main():
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the run; the others only what goes wrong
        if config.DEMO:
            from demo.synthetic import prepare_demo
            ranks.main_decides(prepare_demo)  # rank 0 writes the demo's files
            if not ranks.is_main():
                prepare_demo()  # finds them, and points this process's settings at them
        runs = seed_runs()
        if not config.SUMMARIZE_ONLY:
            df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
            absent = [q for q in config.QUESTION_IDS if q not in set(df["QuestionId"])]
            if absent:
                raise InputError(f"{config.TRAIN_DATA_PATH}: no rows for QuestionId {', '.join(map(str, absent))}")
            if len(runs) > 1:
                ranks.main_decides(lambda: ensemble.write_seeds_record(runs))  # submit.py finds the seeds' runs from the start
            base = config.snapshot()
            for seed, run_dir in runs:
                config.update({**base, "OUTPUT_DIR": run_dir, "SEEDS": str(seed)})
                if len(runs) > 1:
                    log.info("model seed %d of --seeds %s: %s", seed, base["SEEDS"], run_dir)
                failed = train_stages(df, device)
                if failed:
                    break
            config.update(base)
            if len(runs) > 1 and not failed:
                ranks.main_decides(lambda: ensemble.score_seeds(df, runs))
    except InputError as error:
        if ranks.is_main():
            print(f"error: {error}", file=sys.stderr)
        return 2
    if not ranks.is_main():
        return 1 if failed else 0
    summary = write_summary(config.QUESTION_IDS)
    print(report.training_table(summary), flush=True)
    return 1 if failed else 0


def seed_runs():
    """[(model seed, output dir)] of the runs this invocation trains: without --seeds, --seed's into --output-dir;
    with it, the first seed's into --output-dir and each other's into --output-dir/seed_<s>/, all on --seed's split."""
    if not config.SEEDS:
        return [(config.SEED, config.OUTPUT_DIR)]
    try:
        seeds = [int(part) for part in config.SEEDS.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--seeds {config.SEEDS}: not a comma list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {config.SEEDS}: a seed repeats")
    return [(seed, config.OUTPUT_DIR if number == 0 else os.path.join(config.OUTPUT_DIR, f"seed_{seed}"))
            for number, seed in enumerate(seeds)]


def train_stages(df, device):
    """Train the recipe's stages into the current --output-dir and choose each question's source; returns the
    models that failed (a failed stage leaves the later ones untrained)."""
    stages = run_stages()
    trained, failed = [], []
    for number, stage in enumerate(stages, 1):
        config.update(stage)
        if len(stages) > 1:
            log.info("stage %d of %d (%s): %s", number, len(stages), config.RECIPE, stage_text(stage, stages[0]))
        trained += train_stage(df, device)
        failed = failed_models(trained)
        if failed and number < len(stages):
            log.error("%s failed: the later stages of %s were not trained", report.model_name(failed[0]), config.RECIPE)
            break
    ranks.main_decides(lambda: choose_sources(df))
    return failed


def stage_text(stage, first):
    """A stage's scope and the flags by which it differs from the first stage (all of them for the first)."""
    shown = [name for name in ("SCOPE", "EPOCHS", "LEARNING_RATE", "EVAL_STEPS", "INIT_FROM")
             if stage is first or stage[name] != first[name]]
    return ", ".join(f"{config.SETTINGS[name].flag} {stage[name]}" for name in shown if stage[name] != "")


if __name__ == "__main__":
    exit_code = main()
    ranks.finish()
    sys.exit(exit_code)
