"""Train one LoRA sequence classifier per QuestionId.

For each question: its rows, its own label encoder, a stratified train/validation split inside the question
(or K folds), LoRA fine-tuning with evaluation by MAP@3, `best_map3/` (best validation MAP@3) and `best/`
(final model). The base model is loaded once per process and each question's LoRA layers are removed after
it, so start-up is paid once. Questions are independent: with several GPUs one worker process per GPU takes
them from a shared queue, longest first; `--shard K/N` splits them over machines.

    python train.py --train-data train.csv --model /path/to/Qwen3-0.6B --output-dir ver_2
"""
import importlib.metadata
import json
import logging
import math
import multiprocessing
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
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from sklearn.model_selection import StratifiedGroupKFold
from transformers import Trainer, TrainingArguments, set_seed

import config
from data_collator import build_data_collator
from prompts import encode_prompts
from utils import (TARGET_COLUMN, TORCH_DTYPES, InputError, attach_lora, correctness_of, decode_top_k, fit_label_encoder,
                   load_base_model, load_tokenizer, log, map_at_k, predict_logits, read_competition_csv,
                   read_json, read_question_results, resolve_precision, setup_logging, softmax, write_json_atomic)

SETTINGS = [
    "MODEL_NAME", "TRAIN_DATA_PATH", "OUTPUT_DIR", "QUESTION_IDS", "PROMPT_VERSION", "MAX_LEN", "EPOCHS",
    "TRAIN_BATCH_SIZE", "EVAL_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "LEARNING_RATE", "WEIGHT_DECAY",
    "WARMUP_RATIO", "LR_SCHEDULER", "LABEL_SMOOTHING", "CLASS_WEIGHT_POWER", "DUPLICATES", "VAL_FRACTION", "SEED",
    "EVAL_STEPS", "LOGGING_STEPS", "GRADIENT_CHECKPOINTING", "PAD_TO_MULTIPLE_OF", "PRECISION", "OVERWRITE",
    "LORA_RANK", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET_MODULES", "CORRECTNESS_MASK", "USE_WANDB",
    "WANDB_PROJECT", "DEMO", "DEMO_OUTPUT_DIR", "TEST_DATA_PATH", "FOLDS", "GPUS", "WORKERS", "SHARD",
    "SUMMARIZE_ONLY",
]
# The settings that change what training produces: each result records them, and a question whose recorded
# training settings differ from the current ones is retrained.
TRAINING_SETTINGS = [
    "MODEL_NAME", "PROMPT_VERSION", "MAX_LEN", "EPOCHS", "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS",
    "LEARNING_RATE", "WEIGHT_DECAY", "WARMUP_RATIO", "LR_SCHEDULER", "LABEL_SMOOTHING", "CLASS_WEIGHT_POWER",
    "DUPLICATES", "VAL_FRACTION", "FOLDS", "SEED", "EVAL_STEPS", "PRECISION", "LORA_RANK", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_TARGET_MODULES", "CORRECTNESS_MASK",
]
# --val-fraction is held out as m of K folds, m/K its nearest fraction with K at most this.
MAX_VAL_FOLDS = 20
LIBRARIES = ["torch", "transformers", "peft", "scikit-learn"]


def text_groups(rows):
    """One key per distinct (answer, explanation) text; rows that repeat a text share it."""
    return (rows["MC_Answer"] + "\x00" + rows["StudentExplanation"].str.strip().str.lower()).to_numpy()


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


def class_weights(labels, num_classes, power):
    """Loss weight per class, (rows / class rows) ** power, scaled so the mean weight over the rows is 1."""
    counts = np.bincount(labels, minlength=num_classes)
    weights = (len(labels) / np.maximum(counts, 1)) ** power
    return torch.tensor(weights / weights[labels].mean(), dtype=torch.float32)


def training_loss(weights):
    """Cross-entropy with class weights and label smoothing, normalised over the whole accumulated batch."""
    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        total = F.cross_entropy(logits, labels, weight=weights.to(logits.device), label_smoothing=config.LABEL_SMOOTHING,
                                reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else len(labels))
    return loss


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


def save_adapter(model, path):
    """Replace `path` by the model's adapter and head, never leaving a half-written directory."""
    staging = path + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


class MapTrainer(Trainer):
    """A Trainer whose evaluation is the competition's MAP@3, computed as submit.py predicts.

    Every evaluation that beats the best MAP@3 so far rewrites `best_map3_dir`.
    """

    def __init__(self, *args, val_input_ids, val_labels, val_correct, classes, precision, best_map3_dir, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_input_ids = val_input_ids
        self.val_labels = val_labels
        self.val_correct = val_correct
        self.classes = classes
        self.precision = precision
        self.best_map3_dir = best_map3_dir
        self.best = {"map3": -1.0}
        self.best_probs = self.last_probs = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        logits = predict_logits(self.model, self.val_input_ids, self.data_collator, self.args.per_device_eval_batch_size, self.precision)
        probs = self.last_probs = softmax(logits)
        truth = [self.classes[i] for i in self.val_labels]
        loss = float(-np.log(probs[np.arange(len(probs)), self.val_labels] + 1e-12).mean())
        map3 = map_at_k(truth, decode_top_k(probs, self.classes, self.val_correct, config.CORRECTNESS_MASK))
        map3_unmasked = map_at_k(truth, decode_top_k(probs, self.classes, self.val_correct, False))
        log.info("step %d: validation MAP@3 %.4f (unmasked %.4f), loss %.4f", self.state.global_step, map3, map3_unmasked, loss)
        if map3 > self.best["map3"]:
            self.best = {"map3": map3, "map3_unmasked": map3_unmasked, "step": self.state.global_step}
            self.best_probs = probs
            save_adapter(self.model, self.best_map3_dir)
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_map3": map3,
                   f"{metric_key_prefix}_map3_unmasked": map3_unmasked}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def training_arguments(output_dir, n_train, precision):
    steps_per_epoch = math.ceil(n_train / (config.TRAIN_BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS))
    total_steps = steps_per_epoch * config.EPOCHS
    eval_steps = config.EVAL_STEPS if config.EVAL_STEPS >= 1 else max(1, round(config.EVAL_STEPS * total_steps))
    kwargs = dict(
        output_dir=output_dir,
        num_train_epochs=config.EPOCHS,
        per_device_train_batch_size=config.TRAIN_BATCH_SIZE,
        per_device_eval_batch_size=config.EVAL_BATCH_SIZE,
        gradient_accumulation_steps=config.GRADIENT_ACCUMULATION_STEPS,
        learning_rate=config.LEARNING_RATE,
        weight_decay=config.WEIGHT_DECAY,
        # An int count: transformers 4.x reads a float warmup_steps as a step count, 5.x as a ratio.
        warmup_steps=math.ceil(config.WARMUP_RATIO * total_steps),
        lr_scheduler_type=config.LR_SCHEDULER,
        eval_strategy="steps",
        eval_steps=int(eval_steps),
        save_strategy="no",
        logging_steps=config.LOGGING_STEPS,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        report_to=["wandb"] if config.USE_WANDB else "none",
        seed=config.SEED,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    if config.GRADIENT_CHECKPOINTING:
        kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    # Batches of similar length waste little on padding; the option moved in transformers 5.
    if "group_by_length" in TrainingArguments.__dataclass_fields__:
        kwargs["group_by_length"] = True
    else:
        kwargs["train_sampling_strategy"] = "group_by_length"
    return TrainingArguments(**kwargs)


def train_fold(question_id, fold, input_ids, labels, train_labels, correct, classes, train_idx, val_idx, tokenizer,
               base_model, precision):
    """Fine-tune on train_idx with train_labels, evaluate on val_idx with labels; save best_map3/ and best/.

    The base model is left clean.
    """
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=config.LORA_RANK, lora_alpha=config.LORA_ALPHA,
        lora_dropout=config.LORA_DROPOUT, target_modules=config.LORA_TARGET_MODULES,
    )
    set_seed(config.SEED)
    model = attach_lora(base_model, lora_config, len(classes))
    work_dir = os.path.join(config.get_question_output_dir(question_id), "trainer")
    try:
        trainer = MapTrainer(
            model=model,
            args=training_arguments(work_dir, len(train_idx), precision),
            data_collator=build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF),
            train_dataset=[{"input_ids": input_ids[i], "labels": int(train_labels[i])} for i in train_idx],
            eval_dataset=[{"input_ids": input_ids[i], "labels": int(labels[i])} for i in val_idx],
            compute_loss_func=training_loss(class_weights(train_labels[train_idx], len(classes), config.CLASS_WEIGHT_POWER)),
            val_input_ids=[input_ids[i] for i in val_idx],
            val_labels=labels[val_idx],
            val_correct=[correct[i] for i in val_idx],
            classes=classes,
            precision=precision,
            best_map3_dir=config.get_question_model_path(question_id, "best_map3", fold),
        )
        trainer.train()
        evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_map3" in entry]
        if not evaluated or evaluated[-1] != trainer.state.global_step:
            trainer.evaluate()
        final = next(entry for entry in reversed(trainer.state.log_history) if "eval_map3" in entry)
        save_adapter(model, config.get_question_model_path(question_id, "best", fold))
        log_name = "log_history.json" if fold is None else f"log_history_fold_{fold}.json"
        write_json_atomic(os.path.join(config.get_question_log_dir(question_id), log_name), trainer.state.log_history)
    finally:
        model.unload()
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "best_map3": trainer.best["map3"], "best_map3_unmasked": trainer.best["map3_unmasked"],
        "best_step": trainer.best["step"], "final_map3": final["eval_map3"],
        "final_map3_unmasked": final["eval_map3_unmasked"], "steps": trainer.state.global_step,
        "train_rows": len(train_idx), "val_rows": len(val_idx),
    }, {"best_map3": trainer.best_probs, "best": trainer.last_probs}


def write_oof(question_id, rows, classes, labels, correct, folds, probs_by_checkpoint):
    """Save out-of-fold probabilities per checkpoint; return their MAP@3 (masked and not)."""
    scores = {}
    truth = [classes[i] for i in labels]
    for checkpoint, probs in probs_by_checkpoint.items():
        table = pd.DataFrame(probs, columns=classes)
        table.insert(0, "row_id", rows["row_id"].to_numpy())
        table.insert(1, "fold", folds)
        table.insert(2, "label", truth)
        table.to_csv(os.path.join(config.get_question_output_dir(question_id), f"oof_{checkpoint}.csv"), index=False)
        for mask in (True, False):
            key = f"{checkpoint}_oof_map3" + ("" if mask else "_unmasked")
            scores[key] = map_at_k(truth, decode_top_k(probs, classes, correct, mask))
    return scores


def train_question(question_id, rows, tokenizer, base_model, precision):
    """Train one question (one split or K folds); return its results, the summary entry."""
    encoder = fit_label_encoder(rows[TARGET_COLUMN], config.get_question_label_encoder_path(question_id))
    classes = list(encoder.classes_)
    result = {"question_id": question_id, "classes": classes, "num_classes": len(classes), "folds": config.FOLDS,
              "label_counts": rows[TARGET_COLUMN].value_counts().to_dict(), "rows": len(rows)}
    if len(classes) <= 1:
        message = f"Warning: Question {question_id} has only {len(classes)} class(es). Skipping..."
        print(message, flush=True)
        return {**result, "status": "skipped", "reason": message}

    splits = fold_splits(rows, config.FOLDS, config.SEED)
    input_ids, prompt_stats = encode_prompts(rows, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    log.info("question %s: %d rows, %d classes, %s; prompt tokens mean %.0f p95 %.0f max %d, context shortened "
             "in %d rows", question_id, len(rows), len(classes),
             f"{len(splits[0][0])} train / {len(splits[0][1])} val" if config.FOLDS == 1 else f"{config.FOLDS} folds",
             prompt_stats["mean_tokens"], prompt_stats["p95_tokens"], prompt_stats["max_tokens"], prompt_stats["shortened"])
    labels = encoder.transform(rows[TARGET_COLUMN])
    correct = correctness_of(rows)
    # Repeated texts never straddle a split, so resolving them over all rows equals resolving each training side.
    train_labels, trainable = resolve_duplicates(text_groups(rows), labels, config.DUPLICATES)
    splits = [(train_idx[trainable[train_idx]], val_idx) for train_idx, val_idx in splits]
    if config.FOLDS == 1:
        fold_result, _ = train_fold(question_id, None, input_ids, labels, train_labels, correct, classes, *splits[0],
                                    tokenizer, base_model, precision)
        return {**result, **fold_result, "status": "succeeded", "prompt_stats": prompt_stats}

    fold_of_row = np.zeros(len(rows), dtype=int)
    oof = {checkpoint: np.zeros((len(rows), len(classes))) for checkpoint in ("best_map3", "best")}
    fold_results = []
    for fold, (train_idx, val_idx) in enumerate(splits):
        fold_result, probs = train_fold(question_id, fold, input_ids, labels, train_labels, correct, classes, train_idx,
                                        val_idx, tokenizer, base_model, precision)
        fold_results.append(fold_result)
        fold_of_row[val_idx] = fold
        for checkpoint in oof:
            oof[checkpoint][val_idx] = probs[checkpoint]
        log.info("question %s fold %d: best MAP@3 %.4f, final %.4f", question_id, fold, fold_result["best_map3"], fold_result["final_map3"])
    scores = write_oof(question_id, rows, classes, labels, correct, fold_of_row, oof)
    return {
        **result, "status": "succeeded", "prompt_stats": prompt_stats, "fold_results": fold_results,
        # Over every row, each predicted by the fold model that did not see it.
        "best_map3": scores["best_map3_oof_map3"], "best_map3_unmasked": scores["best_map3_oof_map3_unmasked"],
        "final_map3": scores["best_oof_map3"], "final_map3_unmasked": scores["best_oof_map3_unmasked"],
        "train_rows": len(rows), "val_rows": len(rows),
    }


def training_settings():
    """The current TRAINING_SETTINGS as they read back from a results JSON."""
    return json.loads(json.dumps({name: getattr(config, name) for name in TRAINING_SETTINGS}))


def is_complete(question_id):
    """Results exist, were trained with the current training settings and, for a trained question, both
    adapters are on disk."""
    path = config.get_question_results_path(question_id)
    if not os.path.isfile(path):
        return False
    result = read_json(path)
    if result["status"] not in ("succeeded", "skipped"):
        return False
    if "training_settings" not in result:
        log.info("question %s: results without recorded training settings, retraining", question_id)
        return False
    recorded, current = result["training_settings"], training_settings()
    changed = [name for name in TRAINING_SETTINGS if recorded.get(name) != current[name]]
    if changed:
        log.info("question %s: trained with other settings (%s), retraining", question_id,
                 ", ".join(f"{config.FLAGS[name]} {recorded.get(name)} -> {current[name]}" for name in changed))
        return False
    folds = [None] if result.get("folds", 1) == 1 else range(result["folds"])
    adapters = all(os.path.isfile(os.path.join(config.get_question_model_path(question_id, checkpoint, fold), "adapter_config.json"))
                   for checkpoint in ("best", "best_map3") for fold in folds)
    return result["status"] == "skipped" or (result["status"] == "succeeded" and adapters)


def peak_memory_mb(device):
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    return {"peak_rss_mb": rss_kb / 1024, "peak_gpu_memory_mb": gpu}


def run_question(question_id, rows, tokenizer, base_model, precision, device):
    """Train one question with its own log file; a failure is recorded, not raised."""
    # No results file while a question trains: a run killed midway leaves it to be retrained.
    if os.path.isfile(config.get_question_results_path(question_id)):
        os.remove(config.get_question_results_path(question_id))
    handler = setup_logging(os.path.join(config.get_question_log_dir(question_id), "train.log"))
    wandb_run = None
    started = time.time()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if config.USE_WANDB:
            import wandb
            wandb_run = wandb.init(project=config.WANDB_PROJECT, group=os.path.basename(os.path.abspath(config.OUTPUT_DIR)),
                                   name=f"question_{question_id}", config=config.snapshot())
        result = train_question(question_id, rows, tokenizer, base_model, precision)
    except Exception as error:
        log.error("question %s failed:\n%s", question_id, traceback.format_exc())
        result = {"question_id": question_id, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        if wandb_run is not None:
            wandb_run.finish()
        logging.getLogger().removeHandler(handler)
        handler.close()
    result.update(seconds=round(time.time() - started, 2), prompt_version=config.PROMPT_VERSION, max_len=config.MAX_LEN,
                  device=str(device), training_settings=training_settings(),
                  versions={library: importlib.metadata.version(library) for library in LIBRARIES}, **peak_memory_mb(device))
    write_json_atomic(config.get_question_results_path(question_id), result)
    return result


def write_summary(question_ids):
    """Merge the question results on disk into all_questions_summary.json and map3_by_question.png."""
    results = read_question_results(question_ids)
    succeeded = [r for r in results.values() if r["status"] == "succeeded"]
    val_rows = sum(r["val_rows"] for r in succeeded)
    summary = {
        "questions": len(question_ids),
        "succeeded": len(succeeded),
        "failed": sum(r["status"] == "failed" for r in results.values()),
        "skipped": sum(r["status"] == "skipped" for r in results.values()),
        "missing": [q for q in question_ids if q not in results],
        "per_question": {str(q): {key: r.get(key) for key in ("status", "best_map3", "final_map3", "val_rows", "seconds", "error")}
                         for q, r in results.items()},
        # Row-weighted, so a question counts as much as its rows do in the competition's metric. The final
        # checkpoint's score is the estimate; best_map3 was selected on the same rows, so it is optimistic.
        "overall_best_map3": sum(r["best_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "overall_final_map3": sum(r["final_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "val_rows": val_rows,
        "seconds": round(sum(r.get("seconds", 0) for r in results.values()), 2),
        "training_settings": settings_groups(results),
    }
    log_settings_groups(summary["training_settings"])
    write_json_atomic(os.path.join(config.get_summary_dir(), "all_questions_summary.json"), summary)
    if succeeded:
        plot_summary(succeeded, summary["overall_final_map3"])
    return summary


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
            ", ".join(f"{config.FLAGS[name]} {group['settings'].get(name)}" for name in names)
        log.info("questions %s trained with %s", ",".join(map(str, group["questions"])), settings)


def plot_summary(succeeded, overall):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4))
    names = [str(r["question_id"]) for r in succeeded]
    axis.bar(names, [r["final_map3"] for r in succeeded], color="tab:blue", label="final checkpoint")
    axis.scatter(names, [r["best_map3"] for r in succeeded], color="black", marker="_", s=200, zorder=3,
                 label="best_map3 (checkpoint selected on these same rows)")
    axis.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.4f} (final checkpoint, row-weighted)")
    axis.set(xlabel="QuestionId", ylabel="validation MAP@3", ylim=(0, 1), title="Validation MAP@3 by question (final checkpoint)")
    axis.tick_params(axis="x", rotation=45)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(os.path.join(config.get_summary_dir(), "map3_by_question.png"), dpi=100)
    plt.close(figure)


def train_questions(df, question_ids, device):
    """Train questions one after the other in this process (question_ids may be a queue's iterator)."""
    precision = resolve_precision(config.PRECISION, device)
    tokenizer = load_tokenizer(config.MODEL_NAME)
    base_model = None
    for question_id in question_ids:
        if not config.OVERWRITE and is_complete(question_id):
            log.info("question %s: results complete, skipping (use --overwrite to retrain)", question_id)
            continue
        if base_model is None:
            log.info("loading %s (%s on %s)", config.MODEL_NAME, precision, device)
            base_model = load_base_model(config.MODEL_NAME, tokenizer, TORCH_DTYPES[precision], device)
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        result = run_question(question_id, rows, tokenizer, base_model, precision, device)
        log.info("question %s: %s", question_id, {k: result.get(k) for k in ("status", "best_map3", "final_map3", "seconds", "error")})


def worker(device, threads, settings, question_queue):
    """A worker process: its own device and base model, questions from the shared queue until a None."""
    if device.startswith("cuda:"):
        # Before CUDA starts in this process: the worker sees its one GPU only (no DataParallel over the others).
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(int(device.split(":")[1]))
        device = "cuda"
    torch.set_num_threads(threads)
    config.update(settings)
    setup_logging()
    df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
    train_questions(df, iter(question_queue.get, None), device)


def train_parallel(df, question_ids, devices):
    """One worker process per device; questions handed out longest first so the workers finish together."""
    context = multiprocessing.get_context("spawn")
    question_queue = context.Queue()
    sizes = df["QuestionId"].value_counts()
    for question_id in sorted(question_ids, key=lambda q: -sizes[q]):
        question_queue.put(question_id)
    for _ in devices:
        question_queue.put(None)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers = [context.Process(target=worker, args=(device, threads, config.snapshot(), question_queue)) for device in devices]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        for process in workers:
            process.terminate()
        for process in workers:
            process.join()
        raise
    crashed = [process.exitcode for process in workers if process.exitcode != 0]
    for question_id in question_ids:
        if crashed and not os.path.isfile(config.get_question_results_path(question_id)):
            write_json_atomic(config.get_question_results_path(question_id), {
                "question_id": question_id, "status": "failed",
                "error": f"worker process exited with code {crashed[0]} before finishing this question"})


def physical_gpu(index):
    """The CUDA_VISIBLE_DEVICES entry for visible GPU `index`, mapped through the list a scheduler may have set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def training_devices():
    """Devices to train on: the GPUs asked for (indices among the visible ones, all by default), else the CPU,
    WORKERS times."""
    visible = torch.cuda.device_count()
    gpus = list(range(visible)) if config.GPUS == "all" else [int(g) for g in config.GPUS.split(",") if g]
    unknown = [gpu for gpu in gpus if not 0 <= gpu < visible]
    if unknown:
        raise InputError(f"--gpus {config.GPUS}: GPU {unknown[0]} is not among the {visible} visible GPU(s)")
    devices = [f"cuda:{gpu}" for gpu in gpus] or ["cpu"]
    if config.WORKERS:
        devices = [devices[i % len(devices)] for i in range(config.WORKERS)]
    return devices


def shard_questions(df, question_ids, shard):
    """The K-th of N partitions of the questions, balanced by row count and the same on every machine."""
    try:
        index, count = (int(part) for part in shard.split("/"))
        assert 1 <= index <= count
    except (ValueError, AssertionError):
        raise InputError(f"--shard {shard}: expected K/N with 1 <= K <= N") from None
    sizes = df["QuestionId"].value_counts()
    loads = [0] * count
    owner = {}
    for question_id in sorted(question_ids, key=lambda q: (-sizes[q], q)):
        target = loads.index(min(loads))
        loads[target] += sizes[question_id]
        owner[question_id] = target + 1
    return [q for q in question_ids if owner[q] == index]


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], SETTINGS, argv)
    setup_logging()
    try:
        if config.DEMO:
            from demo.synthetic import prepare_demo
            prepare_demo()
        if not config.SUMMARIZE_ONLY:
            df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
            absent = [q for q in config.QUESTION_IDS if q not in set(df["QuestionId"])]
            if absent:
                raise InputError(f"{config.TRAIN_DATA_PATH}: no rows for QuestionId {', '.join(map(str, absent))}")
            question_ids = shard_questions(df, config.QUESTION_IDS, config.SHARD)
            devices = training_devices()
            for device in devices:  # a bad --precision stops here, not inside the workers
                resolve_precision(config.PRECISION, device)
            log.info("training %d questions on %s", len(question_ids), ", ".join(devices))
            if devices == ["cpu"]:
                train_questions(df, question_ids, "cpu")
            else:
                train_parallel(df, question_ids, devices)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = write_summary(config.QUESTION_IDS)
    log.info("summary: %d succeeded, %d failed, %d skipped, %d missing; overall validation MAP@3 %s (final checkpoint); "
             "best_map3 %s (checkpoint selected on these same rows)", summary["succeeded"], summary["failed"],
             summary["skipped"], len(summary["missing"]), summary["overall_final_map3"], summary["overall_best_map3"])
    if config.SUMMARIZE_ONLY:
        return 0
    return 1 if any(summary["per_question"].get(str(q), {}).get("status") == "failed" for q in question_ids) else 0


if __name__ == "__main__":
    sys.exit(main())
