"""Write submission.csv from the adapters train.py saved: offline, every row, never a crash.

The base model is loaded once per process; each question's adapter and head are attached to it in turn.
A question without a usable model falls back to its training label frequencies, with a warning. The last
line counts the questions predicted by a model and by label frequencies; the exit code is 1 (after the file is
written) when a question that should have had a model fell back, unless --allow-fallback.

    python submit.py --test-data test.csv --model /path/to/Qwen3-0.6B --output-dir ver_2
"""
import contextlib
import copy
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import config
import ensemble
import report
from data_collator import build_data_collator
from prompts import encode_prompts
from sources import chosen_weights, global_weight
from utils import (TARGET_COLUMN, TOP_K, TORCH_DTYPES, InputError, allowed_classes, blend_probabilities, correctness_of,
                   decode_top_k, frequency_probabilities, label_probabilities, load_adapter, load_base_model, load_tokenizer, log,
                   lora_merged, predict_logits, question_label_mask, read_competition_csv, read_question_results, resolve_precision,
                   setup_logging)

# The last resort when no training results exist at all: still three distinct, plausible labels.
LAST_RESORT_LABELS = ["True_Correct:NA", "False_Neither:NA", "True_Neither:NA", "False_Correct:NA"]


def frequency_table(results, question_id):
    """(labels, frequencies) of a question from training, else of all questions pooled."""
    counts = results.get(question_id, {}).get("label_counts")
    if not counts:
        counts = {}
        for entry in results.values():
            for label, count in entry.get("label_counts", {}).items():
                counts[label] = counts.get(label, 0) + count
    if not counts:
        return LAST_RESORT_LABELS, np.linspace(1.0, 0.5, len(LAST_RESORT_LABELS))
    labels = sorted(counts, key=lambda label: -counts[label])
    return labels, np.array([counts[label] for label in labels], dtype=float)


class Predictor:
    """One device's copy of the base model, onto which question adapters are attached in turn."""

    def __init__(self, base_model, tokenizer, device):
        self.device = torch.device(device)
        # Moved, not cast: loaded in its precision as train.py loads it (utils.load_base_model), the model keeps the
        # buffers transformers builds in fp32 (Qwen3's RoPE frequencies), which .to(dtype) would round.
        self.base_model = base_model.to(self.device)
        self.precision = next(name for name, dtype in TORCH_DTYPES.items() if dtype == self.base_model.dtype)
        self.tokenizer = tokenizer
        self.collator = build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF)

    def probabilities(self, question_id, rows, result):
        """(full labels, probabilities, models used: (fold models, whether the refit model)) of a question or of
        GLOBAL, from the models --predict-with asks for: the fold models' mean, the refit model, or both at equal
        weight. Where the refit model is unusable, the fold models alone; raises when none can be used."""
        members = predicted_members(result)
        labels, probs = self.member_probabilities(question_id, rows, result, members)
        if members == [config.REFIT_MODEL] and not probs:
            labels, probs = self.member_probabilities(question_id, rows, result, fold_members(result))
        if not probs:
            raise ValueError(f"no usable fold model under {config.get_question_output_dir(question_id)}")
        refit = probs.pop(config.REFIT_MODEL, None)
        parts = ([np.mean(list(probs.values()), axis=0)] if probs else []) + ([] if refit is None else [refit])
        return labels, np.mean(parts, axis=0), (len(probs), refit is not None)

    def fold_probabilities(self, question_id, rows, result):
        """(full labels, probabilities of each usable fold model); raises when none can be used."""
        labels, probs = self.member_probabilities(question_id, rows, result, fold_members(result))
        if not probs:
            raise ValueError(f"no usable fold model under {config.get_question_output_dir(question_id)}")
        return labels, list(probs.values())

    def member_probabilities(self, question_id, rows, result, members):
        """(full labels, {member: probabilities} of each usable one of a model's `members`: fold numbers, None for
        one split (raises when unusable), config.REFIT_MODEL); an unusable member is skipped with a warning.

        A global model's scores are restricted to the labels its training saw for each row's question.
        """
        classes = question_classes(question_id, result)
        allowed = None
        if question_id == config.GLOBAL:
            allowed = allowed_classes(rows["QuestionId"], classes, result["question_classes"])
        correct = correctness_of(rows)
        input_ids, _ = encode_prompts(rows, self.tokenizer, result.get("prompt_version", config.PROMPT_VERSION),
                                      result.get("max_len", config.MAX_LEN))
        labels, probs = None, {}
        for member in members:
            # The refit model has no validation rows, so no best_map3/: its final adapter whatever --checkpoint says.
            path = config.get_question_model_path(question_id, "best" if member == config.REFIT_MODEL else None, member)
            try:
                model = load_adapter(self.base_model, path, len(classes))
            except Exception as error:
                if member is None:
                    raise
                log.warning("question %s: skipping %s (%s: %s)", question_id, path, type(error).__name__, error)
                continue
            try:
                with lora_merged(model) if config.MERGE_LORA else contextlib.nullcontext():
                    logits = predict_logits(model, input_ids, self.collator, config.EVAL_BATCH_SIZE, self.precision)
            finally:
                model.unload()
            labels, probs[member] = label_probabilities(logits, classes, correct, allowed)
        return labels, probs


def fold_members(result):
    """The fold models of a question's (or GLOBAL's) results: fold numbers, [None] for one split."""
    folds = result.get("folds", 1)
    return [None] if folds == 1 else list(range(folds))


def predicted_members(result):
    """The models --predict-with asks for; the fold models where train.py saved no refit model (no --refit)."""
    if result.get("refit", {}).get("status") != "succeeded":
        return fold_members(result)
    return {"folds": fold_members(result), "refit": [config.REFIT_MODEL],
            "both": fold_members(result) + [config.REFIT_MODEL]}[config.PREDICT_WITH]


def question_classes(question_id, result):
    """The classes of a question's (or GLOBAL's) label encoder, else (an older scikit-learn cannot unpickle it)
    those in its results."""
    path = config.get_question_label_encoder_path(question_id)
    recorded = result.get("classes")
    try:
        classes = list(joblib.load(path).classes_)
    except Exception as error:
        if not recorded:
            raise
        log.warning("question %s: %s unreadable (%s: %s); using the classes in its results", question_id, path,
                    type(error).__name__, error)
        return recorded
    if recorded is not None and classes != recorded:
        raise ValueError(f"{path}: classes differ from those in {config.get_question_results_path(question_id)}")
    return classes


# Why a question was predicted by label frequencies; these two mean that a model was expected.
MODEL_UNUSABLE = "model unusable"
NO_RESULTS = "no training results"


def predict_group(predictor, question_id, rows, results, global_part=None, weight=None):
    """(a question's predictions, how they were made, None or why they come from label frequencies): its model,
    the global model's (labels, probabilities, how) for these rows, or their blend (`weight`, by default
    GLOBAL_WEIGHT, on the global model); label frequencies when neither is usable."""
    labels, probs, fill, how, why = group_probabilities(predictor, question_id, rows, results, global_part, weight)
    return decode(labels, probs, fill, rows), how, why


def decode(labels, probs, fill, rows):
    """The top-3 labels of each row: the one place where probabilities become predictions."""
    return decode_top_k(probs, labels, correctness_of(rows), config.CORRECTNESS_MASK, fill)


def group_probabilities(predictor, question_id, rows, results, global_part=None, weight=None):
    """(labels, probabilities of the rows, labels that fill a top 3 of fewer classes, how, None or why label
    frequencies): predict_group's probabilities, label frequencies for every row where no model is usable.

    A question skipped in training (one class) predicts that class first: its frequency table.
    """
    labels, frequencies = frequency_table(results, question_id)
    global_labels, _ = frequency_table(results, None)
    fill = list(dict.fromkeys(labels + global_labels + LAST_RESORT_LABELS))
    status = results.get(question_id, {}).get("status")
    source = "its" if question_id in results else "global"
    wanted = question_id in config.QUESTION_IDS
    why = {"skipped": "one class in training", "failed": "training failed",
           None: NO_RESULTS if wanted else "never trained"}.get(status, "not in --questions")
    weight = config.GLOBAL_WEIGHT if weight is None else weight
    parts, used = [], []
    if status == "succeeded" and predictor is not None and wanted and (global_part is None or weight < 1):
        try:
            part_labels, probs, models = predictor.probabilities(question_id, rows, results[question_id])
            parts.append((1 - weight, part_labels, probs))
            used.append(models_used("model", models, results[question_id].get("folds", 1)))
        except Exception as error:
            if global_part is None and weight == 0:  # the global model was not run for this question
                global_part = global_probabilities([predictor], rows).get(question_id)
            log.warning("question %s: model unusable (%s: %s); using %s", question_id, type(error).__name__, error,
                        "the global model" if global_part else "its label frequencies")
            why = MODEL_UNUSABLE
    elif status != "skipped" and global_part is None:
        log.warning("question %s: %s; using %s label frequencies", question_id, why, source)
    if global_part is not None and (weight > 0 or not parts):
        parts.append((weight, *global_part[:2]))
        used.append(global_part[2])
    if not parts:
        return labels, frequency_probabilities(frequencies, len(rows)), fill, f"{source} label frequencies ({why})", why
    if len(parts) == 1:  # the weight applies where both models exist
        parts = [(1.0, *parts[0][1:])]
    blend_labels, probs = blend_probabilities(parts)
    how = used[0] if len(used) == 1 else f"{used[0]} + {used[1]}, global weight {weight:g}"
    return blend_labels, probs, fill, how, None


def models_used(name, models, folds):
    """How submit.py's table names the models used (`models`: fold models, whether the refit model), e.g.
    "model (3 folds + refit)", "global model (2 of 3 folds)"."""
    fold_models, refit = models
    parts = [] if not fold_models else \
        [f"{fold_models} of {folds} folds" if fold_models < folds else f"{folds} fold{'s' * (folds > 1)}"]
    return f"{name} ({' + '.join(parts + ['refit'] * refit)})"


def global_probabilities(predictors, test_df):
    """{QuestionId: (labels, probabilities of its rows, how)} from the global model, for the questions it trained
    on; {} without a usable one. The rows are split over the predictors (one per device), which run at once."""
    result = read_question_results([config.GLOBAL]).get(config.GLOBAL)
    if predictors[0] is None or not result or result.get("status") != "succeeded":
        return {}
    rows = test_df[test_df["QuestionId"].astype(str).isin(result["question_classes"])
                   & test_df["QuestionId"].isin(config.QUESTION_IDS)]
    if rows.empty:
        return {}
    shares = [share for share in np.array_split(np.arange(len(rows)), len(predictors)) if len(share)]
    try:
        with ThreadPoolExecutor(len(shares)) as pool:
            outputs = list(pool.map(lambda predictor, share: predictor.probabilities(config.GLOBAL, rows.iloc[share], result),
                                    predictors, shares))
    except Exception as error:
        log.warning("global model unusable (%s: %s); using the question models", type(error).__name__, error)
        return {}
    labels = outputs[0][0]
    probs = np.concatenate([output[1] for output in outputs])
    models = min(output[2] for output in outputs)
    how = models_used("global model", models, result.get("folds", 1))
    positions = rows.reset_index(drop=True).groupby("QuestionId").indices
    parts = {}
    for question_id, index in positions.items():
        # Only the question's own labels: another question's label, at probability 0, could still rank third.
        own = question_label_mask([question_id], labels, result["question_classes"])[0]
        parts[int(question_id)] = ([label for label, keep in zip(labels, own) if keep], probs[index][:, own], how)
    return parts


def visible_devices():
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def balance(groups, n_workers):
    """Split question groups over workers, largest first onto the least loaded one."""
    loads = [[0, []] for _ in range(n_workers)]
    for question_id, rows in sorted(groups, key=lambda group: -len(group[1])):
        target = min(loads, key=lambda load: load[0])
        target[0] += len(rows)
        target[1].append((question_id, rows))
    return [work for _, work in loads]


def load_predictors(model_name, devices):
    """One Predictor per device, on one disk load of the base model."""
    precisions = sorted({resolve_precision(config.PRECISION, device) for device in devices})
    if len(precisions) > 1:
        raise InputError(f"--precision {config.PRECISION}: the devices resolve it differently ({', '.join(precisions)}); "
                         "give one precision for all, e.g. --precision fp16")
    precision = precisions[0]
    with ThreadPoolExecutor(1) as pool:
        # transformers parses the tokenizer (about 1 s for Qwen3's) while the base model loads.
        tokenizer = pool.submit(load_tokenizer, model_name, offline=True)
        base_model = load_base_model(model_name, tokenizer, TORCH_DTYPES[precision], "cpu", offline=True)
        tokenizer = tokenizer.result()
    # Each extra device gets copies, made on the CPU before the first device takes the original; a fast
    # tokenizer must not be shared between threads.
    copies = [(copy.deepcopy(base_model), copy.deepcopy(tokenizer)) for _ in devices[1:]]
    return [Predictor(model, device_tokenizer, device)
            for (model, device_tokenizer), device in zip([(base_model, tokenizer)] + copies, devices)]


def run_probabilities(test_df, devices, predictors_of, bar):
    """{QuestionId: (labels, probabilities, fill labels, how, None or why label frequencies, seconds)} of every
    question of the test frame, from the run in --output-dir; `predictors_of(model)` gives its loaded predictors."""
    results = read_question_results(sorted(set(config.QUESTION_IDS) | set(test_df["QuestionId"])))
    groups = [(int(qid), rows) for qid, rows in test_df.groupby("QuestionId", sort=False)]
    needs_model = any(qid in config.QUESTION_IDS and results.get(qid, {}).get("status") == "succeeded" for qid, _ in groups)
    needs_model |= os.path.isfile(config.get_question_results_path(config.GLOBAL))
    predictors = predictors_of(config.MODEL_NAME) if needs_model else [None] * len(devices)
    chosen = chosen_weights(config.CHECKPOINT)
    weights = {qid: global_weight(qid, chosen) for qid, _ in groups}
    # At weight 0 the global model only stands in for a question without a model of its own (predict_group adds
    # the questions whose model turns out unusable).
    own_only = [qid for qid in config.QUESTION_IDS if results.get(qid, {}).get("status") == "succeeded" and weights.get(qid) == 0]
    global_parts = global_probabilities(predictors, test_df[~test_df["QuestionId"].isin(own_only)])
    parts = {}

    def run(worker):
        predictor, work = worker
        for question_id, rows in work:
            started = time.time()
            part = group_probabilities(predictor, question_id, rows, results, global_parts.get(question_id),
                                       weights[question_id])
            parts[question_id] = (*part, time.time() - started)
            bar.update(len(rows))

    workers = list(zip(predictors, balance(groups, len(devices))))
    with ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(run, workers))
    return parts


def predict(test_df, devices=None, record=None):
    """(top-3 label lists for every row of the test frame, in its order; per question (id, rows, how, seconds);
    {question: None or why it was predicted by label frequencies}). Several runs in --output-dir are blended with
    the weights of `record` (ensemble.py): a run predicts only the questions where its weight is above 0, unless
    every run weighted there turns out unusable, when the runs at weight 0 stand in."""
    devices = devices or visible_devices()
    dirs = ensemble.run_dirs()
    questions = [int(qid) for qid in test_df["QuestionId"].unique()]
    weights = {qid: ensemble.weights_of(record, qid) if record else [1.0] for qid in questions}
    runs = predict_runs(test_df, dirs, [[qid for qid in questions if weights[qid][run] > 0] for run in range(len(dirs))],
                        devices)
    unusable = [qid for qid in questions if not any(qid in run and run[qid][4] is None for run in runs)]
    stand_ins = [[qid for qid in unusable if qid not in run] for run in runs]
    if any(stand_ins):
        for run, stand_in in zip(runs, predict_runs(test_df, dirs, stand_ins, devices)):
            run.update(stand_in)
    predictions, done, fallbacks = {}, [], {}
    for question_id, rows in test_df.groupby("QuestionId", sort=False):
        parts = [run.get(int(question_id)) for run in runs]
        if len(parts) == 1:
            labels, probs, fill, how, why, seconds = parts[0]
        else:
            labels, probs, fill, how, why, seconds = blend_runs(parts, weights[int(question_id)], dirs)
        predictions.update(zip(rows["row_id"], decode(labels, probs, fill, rows)))
        done.append((int(question_id), len(rows), how, seconds))
        fallbacks[int(question_id)] = why
    return [predictions[row_id] for row_id in test_df["row_id"]], done, fallbacks


def predict_runs(test_df, dirs, wanted, devices):
    """For each run, {QuestionId: part} (run_probabilities, its seeds averaged) of the questions it is `wanted` for.
    Runs with the same base model share its load; a base model's runs go one after the other, and its copies are
    freed after its last, so two backbones need not fit a GPU at once."""
    loaded = {}

    def predictors_of(model_name):
        if model_name not in loaded:
            loaded[model_name] = load_predictors(model_name, devices)
        return loaded[model_name]

    models = ensemble.run_models(dirs)
    order = [run for run in sorted(range(len(dirs)), key=lambda run: models.index(models[run])) if wanted[run]]
    runs = [{} for _ in dirs]
    seeds = [ensemble.seed_dirs(run_dir) for run_dir in dirs]
    rows = [test_df[test_df["QuestionId"].isin(questions)] for questions in wanted]
    bar = tqdm(total=sum(len(rows[run]) * len(seeds[run]) for run in order), unit="row", desc="predicting",
               dynamic_ncols=True, disable=None)  # a terminal only
    with logging_redirect_tqdm():
        for position, run in enumerate(order):
            parts = []
            for seed_dir in seeds[run]:
                with ensemble.in_run(seed_dir, models[run]):
                    parts.append(run_probabilities(rows[run], devices, predictors_of, bar))
            runs[run] = parts[0] if len(parts) == 1 else average_seeds(parts, seeds[run])
            if models[run] not in [models[later] for later in order[position + 1:]]:
                loaded.pop(models[run], None)
    bar.close()
    return runs


def average_seeds(seed_parts, seed_dirs):
    """A seeds run's {QuestionId: part} (run_probabilities) from its seeds' runs', at equal weights."""
    average = {}
    for question_id in seed_parts[0]:
        parts = [seed[question_id] for seed in seed_parts]
        labels, probs, fill, _, why, seconds = blend_runs(parts, [1.0] * len(parts), seed_dirs)
        usable = [part for part in parts if part[4] is None]
        how = parts[0][3] if not usable else usable[0][3] + (
            f", {len(usable)} of {len(parts)} seeds" if len(usable) < len(parts) else f", {len(parts)} seeds")
        average[question_id] = (labels, probs, fill, how, why, seconds)
    return average


def blend_runs(parts, weights, dirs):
    """One question's part (run_probabilities) from each run's (None: the run was not asked, at weight 0), at the
    runs' weights. A run whose model was not usable for the question is left out; where only runs at weight 0 have
    one, they stand in at equal weights, and where none has, the first run's label frequencies do."""
    predicted = [part for part in parts if part is not None]
    usable = [(weight, part) for weight, part in zip(weights, parts) if part is not None and part[4] is None]
    if not usable:
        return predicted[0][:5] + (sum(part[5] for part in predicted),)
    if not any(weight > 0 for weight, _ in usable):
        usable = [(1.0, part) for _, part in usable]
    usable = sorted([(weight, part) for weight, part in usable if weight > 0], key=lambda item: -item[0])
    if len(usable) == 1:
        labels, probs = usable[0][1][:2]
    else:
        labels, probs = ensemble.blend_runs([weight for weight, _ in usable], [part[:2] for _, part in usable])
    fill = list(dict.fromkeys(label for _, part in usable for label in part[2]))
    how = "; ".join(f"{weight:g} {os.path.basename(os.path.normpath(run_dir))}: "
                    + ("not run" if part is None else part[3]) for weight, part, run_dir in zip(weights, parts, dirs))
    return labels, probs, fill, how, None, sum(part[5] for part in predicted)


def fallback_report(fallbacks):
    """The closing line, and the questions that should have been predicted by a model but were not."""
    by_reason = {}
    for question_id, reason in sorted(fallbacks.items()):
        if reason:
            by_reason.setdefault(reason, []).append(str(question_id))
    reasons = "; ".join(f"{reason}: {', '.join(ids)}" for reason, ids in by_reason.items())
    by_frequencies = sum(len(ids) for ids in by_reason.values())
    line = (f"{len(fallbacks) - by_frequencies} of {len(fallbacks)} questions predicted by their model; "
            f"{by_frequencies} by label frequencies" + (f" ({reasons})" if reasons else ""))
    unexpected = [int(q) for reason in (MODEL_UNUSABLE, NO_RESULTS) for q in by_reason.get(reason, [])]
    return line, sorted(unexpected)


def check_writable(path):
    """InputError unless the submission can be written at `path`: checked before the first forward pass."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w"):
            pass
        os.remove(path + ".tmp")
    except OSError as error:
        raise InputError(f"--submission {path}: cannot be written ({error.strerror or error})") from None


def write_submission(path, row_ids, predictions):
    """Write the submission, then re-read it and check every row: 3 distinct labels, ids in order."""
    submission = pd.DataFrame({"row_id": list(row_ids), TARGET_COLUMN: [" ".join(labels) for labels in predictions]})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = path + ".tmp"
    submission.to_csv(staging, index=False)
    os.replace(staging, path)
    written = pd.read_csv(path, keep_default_na=False, dtype=str)
    if list(written.columns) != ["row_id", TARGET_COLUMN] or list(written["row_id"]) != list(map(str, row_ids)):
        raise RuntimeError(f"{path}: written file does not match the test rows")
    bad = [text for text in written[TARGET_COLUMN] if len(set(text.split())) != TOP_K or len(text.split()) != TOP_K]
    if bad:
        raise RuntimeError(f"{path}: {len(bad)} rows without {TOP_K} distinct labels, e.g. {bad[0]!r}")
    return written


def ensemble_record(dirs):
    """The runs' weights, written to ensemble.json (None for one run): --ensemble-weights, else fitted on the runs'
    out-of-fold files and --train-data's rows."""
    try:
        weights = [float(part) for part in config.ENSEMBLE_WEIGHTS.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--ensemble-weights {config.ENSEMBLE_WEIGHTS}: not a comma list of numbers") from None
    if len(dirs) == 1:
        if weights:
            raise InputError(f"--ensemble-weights {config.ENSEMBLE_WEIGHTS}: weighs the runs of --output-dir A,B,...; "
                             f"--output-dir {config.OUTPUT_DIR} is one run")
        return None
    if weights:
        record = ensemble.fixed_record(dirs, weights)
    else:
        try:
            train_df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
        except InputError as error:
            raise InputError(f"--train-data {error} (an ensemble of runs fits their weights on its rows)") from None
        record = ensemble.fit_record(train_df, dirs, config.CHECKPOINT)
    ensemble.write_record(record)
    return record


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], "submit", argv)
    setup_logging()
    try:
        if config.DEMO:
            from demo.synthetic import prepare_demo
            prepare_demo()
        test_df = read_competition_csv(config.TEST_DATA_PATH, labelled=False)
        check_writable(config.SUBMISSION_PATH)
        dirs = ensemble.run_dirs()
        for run_dir in dirs:
            with ensemble.in_run(run_dir):
                if not config.ALLOW_FALLBACK and not read_question_results([*config.QUESTION_IDS, config.GLOBAL]):
                    # A mistyped --output-dir would otherwise write label frequencies for every row, and a notebook's
                    # `!python` cell ignores the exit code.
                    raise InputError(f"--output-dir {run_dir}: no training results (summary/*_results.json) for any "
                                     f"question; check the path (--allow-fallback writes label frequencies)")
        record = ensemble_record(dirs)
        started = time.time()
        predictions, done, fallbacks = predict(test_df, record=record)
        seconds = time.time() - started
        write_submission(config.SUBMISSION_PATH, test_df["row_id"], predictions)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.prediction_table(done, seconds), flush=True)
    if record:
        print(report.ensemble_line(record, ensemble.record_path()), flush=True)
    log.info("wrote %s: %d rows", config.SUBMISSION_PATH, len(test_df))
    line, unexpected = fallback_report(fallbacks)
    if unexpected and not config.ALLOW_FALLBACK:
        log.error("question(s) %s should have been predicted by their model (see the warnings above); the file is "
                  "complete, exit code 1 (--allow-fallback accepts this)", ", ".join(map(str, unexpected)))
    print(line, flush=True)
    return 1 if unexpected and not config.ALLOW_FALLBACK else 0


if __name__ == "__main__":
    sys.exit(main())
