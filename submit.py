"""Write submission.csv from the adapters train.py saved: offline, every row, never a crash.

The base model is loaded once per process; each question's adapter and head are attached to it in turn.
A question without a usable model falls back to its training label frequencies, with a warning. The last
line counts the questions predicted by their model and by label frequencies; the exit code is 1 (after the
file is written) when a question that should have had a model fell back, unless --allow-fallback.

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

import config
from data_collator import build_data_collator
from prompts import encode_prompts
from utils import (TARGET_COLUMN, TOP_K, TORCH_DTYPES, InputError, correctness_of, decode_top_k, load_adapter,
                   load_base_model, load_tokenizer, log, lora_merged, predict_logits, read_competition_csv, read_question_results,
                   resolve_precision, setup_logging, softmax)

SETTINGS = [
    "MODEL_NAME", "TEST_DATA_PATH", "OUTPUT_DIR", "SUBMISSION_PATH", "CHECKPOINT", "EVAL_BATCH_SIZE",
    "QUESTION_IDS", "CORRECTNESS_MASK", "MERGE_LORA", "PRECISION", "PAD_TO_MULTIPLE_OF", "ALLOW_FALLBACK", "DEMO",
    "DEMO_OUTPUT_DIR",
]
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


def fallback_labels(rows, labels, frequencies, fill):
    probs = np.tile(frequencies / frequencies.sum(), (len(rows), 1))
    return decode_top_k(probs, labels, correctness_of(rows), config.CORRECTNESS_MASK, fill)


class Predictor:
    """One device's copy of the base model, onto which question adapters are attached in turn."""

    def __init__(self, base_model, tokenizer, device):
        self.device = torch.device(device)
        self.precision = resolve_precision(config.PRECISION, self.device)
        self.base_model = base_model.to(self.device, TORCH_DTYPES[self.precision])
        self.tokenizer = tokenizer
        self.collator = build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF)

    def predict(self, question_id, rows, result, fill):
        """Top-3 labels per row, from the mean probabilities of the question's fold models (one without --folds)."""
        classes, probs = self.fold_probabilities(question_id, rows, result)
        return decode_top_k(np.mean(probs, axis=0), classes, correctness_of(rows), config.CORRECTNESS_MASK, fill)

    def fold_probabilities(self, question_id, rows, result):
        """(classes, probabilities of each usable fold model of the question); raises when none can be used."""
        classes = question_classes(question_id, result)
        input_ids, _ = encode_prompts(rows, self.tokenizer, result.get("prompt_version", config.PROMPT_VERSION),
                                      result.get("max_len", config.MAX_LEN))
        folds = result.get("folds", 1)
        probs = []
        for fold in [None] if folds == 1 else range(folds):
            path = config.get_question_model_path(question_id, fold=fold)
            try:
                model = load_adapter(self.base_model, path, len(classes))
            except Exception as error:
                if folds == 1:
                    raise
                log.warning("question %s: skipping %s (%s: %s)", question_id, path, type(error).__name__, error)
                continue
            try:
                with lora_merged(model) if config.MERGE_LORA else contextlib.nullcontext():
                    probs.append(softmax(predict_logits(model, input_ids, self.collator, config.EVAL_BATCH_SIZE, self.precision)))
            finally:
                model.unload()
        if not probs:
            raise ValueError(f"no usable fold model under {config.get_question_output_dir(question_id)}")
        return classes, probs


def question_classes(question_id, result):
    """The question's classes from its label encoder, else (an older scikit-learn cannot unpickle it) its results."""
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


def predict_group(predictor, question_id, rows, results):
    """(a question's predictions, None or why they come from label frequencies instead of its model).

    A question skipped in training (one class) predicts that class first: its frequency table.
    """
    labels, frequencies = frequency_table(results, question_id)
    global_labels, _ = frequency_table(results, None)
    fill = list(dict.fromkeys(labels + global_labels + LAST_RESORT_LABELS))
    status = results.get(question_id, {}).get("status")
    wanted = question_id in config.QUESTION_IDS
    if status == "succeeded" and wanted:
        try:
            return predictor.predict(question_id, rows, results[question_id], fill), None
        except Exception as error:
            log.warning("question %s: model unusable (%s: %s); using its label frequencies", question_id, type(error).__name__, error)
            return fallback_labels(rows, labels, frequencies, fill), MODEL_UNUSABLE
    if status == "skipped":
        return fallback_labels(rows, labels, frequencies, fill), "one class in training"
    if status == "succeeded":
        reason = "not in --questions"
    elif status == "failed":
        reason = "training failed"
    else:
        reason = NO_RESULTS if wanted else "never trained"
    log.warning("question %s: %s; using %s label frequencies", question_id, reason, "its" if question_id in results else "global")
    return fallback_labels(rows, labels, frequencies, fill), reason


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


def predict(test_df, devices=None):
    """(top-3 label lists for every row of the test frame, in its order; {question: None or why by frequencies})."""
    results = read_question_results(sorted(set(config.QUESTION_IDS) | set(test_df["QuestionId"])))
    groups = [(int(qid), rows) for qid, rows in test_df.groupby("QuestionId", sort=False)]
    needs_model = any(qid in config.QUESTION_IDS and results.get(qid, {}).get("status") == "succeeded" for qid, _ in groups)
    devices = devices or visible_devices()
    predictors = [None] * len(devices)
    if needs_model:
        tokenizer = load_tokenizer(config.MODEL_NAME, offline=True)
        precision = resolve_precision(config.PRECISION, devices[0])
        base_model = load_base_model(config.MODEL_NAME, tokenizer, TORCH_DTYPES[precision], "cpu", offline=True)
        # Each extra device gets copies, made on the CPU before the first device takes the original; a fast
        # tokenizer must not be shared between threads.
        copies = [(copy.deepcopy(base_model), copy.deepcopy(tokenizer)) for _ in devices[1:]]
        predictors = [Predictor(model, device_tokenizer, device)
                      for (model, device_tokenizer), device in zip([(base_model, tokenizer)] + copies, devices)]
    predictions, fallbacks = {}, {}

    def run(worker):
        predictor, work = worker
        for question_id, rows in work:
            labels, fallbacks[question_id] = predict_group(predictor, question_id, rows, results)
            predictions.update(zip(rows["row_id"], labels))

    workers = list(zip(predictors, balance(groups, len(devices))))
    with ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(run, workers))
    return [predictions[row_id] for row_id in test_df["row_id"]], fallbacks


def fallback_report(fallbacks):
    """The closing line, and the questions that should have been predicted by their model but were not."""
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


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], SETTINGS, argv, flags={"EVAL_BATCH_SIZE": "--batch-size"})
    setup_logging()
    try:
        if config.DEMO:
            from demo.synthetic import prepare_demo
            prepare_demo()
        test_df = read_competition_csv(config.TEST_DATA_PATH, labelled=False)
        started = time.time()
        predictions, fallbacks = predict(test_df)
        seconds = time.time() - started
        write_submission(config.SUBMISSION_PATH, test_df["row_id"], predictions)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("wrote %s: %d rows, predicted in %.1f s (%.0f rows/s, model loading included)",
             config.SUBMISSION_PATH, len(test_df), seconds, len(test_df) / max(seconds, 1e-9))
    line, unexpected = fallback_report(fallbacks)
    if unexpected and not config.ALLOW_FALLBACK:
        log.error("question(s) %s should have been predicted by their model (see the warnings above); the file is "
                  "complete, exit code 1 (--allow-fallback accepts this)", ", ".join(map(str, unexpected)))
    print(line, flush=True)
    return 1 if unexpected and not config.ALLOW_FALLBACK else 0


if __name__ == "__main__":
    sys.exit(main())
