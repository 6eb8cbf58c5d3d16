"""Train one LoRA sequence classifier per QuestionId.

For each question: its rows, its own label encoder, a stratified train/validation split inside the question,
LoRA fine-tuning with evaluation by MAP@3, `best_map3/` (best validation MAP@3) and `best/` (final model).
The base model is loaded once and each question's LoRA layers are removed after it, so start-up is paid once.

    python train.py --train-data train.csv --model /path/to/Qwen3-0.6B --output-dir ver_2
"""
import logging
import math
import os
import resource
import shutil
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from peft import LoraConfig, TaskType
from sklearn.model_selection import StratifiedGroupKFold
from transformers import Trainer, TrainingArguments, set_seed

import config
from data_collator import build_data_collator
from prompts import encode_prompts
from utils import (TARGET_COLUMN, TORCH_DTYPES, InputError, attach_lora, correctness_of, decode_top_k, fit_label_encoder,
                   load_base_model, load_tokenizer, log, map_at_k, predict_logits, read_competition_csv,
                   read_json, resolve_precision, setup_logging, softmax, write_json_atomic)

SETTINGS = [
    "MODEL_NAME", "TRAIN_DATA_PATH", "OUTPUT_DIR", "QUESTION_IDS", "PROMPT_VERSION", "MAX_LEN", "EPOCHS",
    "TRAIN_BATCH_SIZE", "EVAL_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "LEARNING_RATE", "WEIGHT_DECAY",
    "WARMUP_RATIO", "LR_SCHEDULER", "VAL_FRACTION", "SEED", "EVAL_STEPS", "LOGGING_STEPS",
    "GRADIENT_CHECKPOINTING", "PAD_TO_MULTIPLE_OF", "PRECISION", "OVERWRITE", "LORA_RANK", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_TARGET_MODULES", "CORRECTNESS_MASK", "USE_WANDB", "WANDB_PROJECT", "DEMO",
    "DEMO_OUTPUT_DIR", "TEST_DATA_PATH",
]


def split_rows(rows, seed):
    """Indices (train, val): stratified by label, repeated texts kept on one side.

    Classes with a single row cannot be stratified; they stay in training.
    """
    n_splits = max(2, round(1 / config.VAL_FRACTION))
    labels = rows[TARGET_COLUMN].to_numpy()
    groups = (rows["MC_Answer"] + "\x00" + rows["StudentExplanation"].str.strip().str.lower()).to_numpy()
    if len(set(groups)) < n_splits:
        raise InputError(f"question {rows['QuestionId'].iloc[0]}: {len(set(groups))} distinct texts, too few for --val-fraction {config.VAL_FRACTION}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(np.zeros(len(rows)), labels, groups))
    counts = rows[TARGET_COLUMN].value_counts()
    singletons = np.isin(labels[val_idx], counts[counts < 2].index)
    train_idx = np.sort(np.concatenate([train_idx, val_idx[singletons]]))
    return train_idx, val_idx[~singletons]


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

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        logits = predict_logits(self.model, self.val_input_ids, self.data_collator, self.args.per_device_eval_batch_size, self.precision)
        probs = softmax(logits)
        truth = [self.classes[i] for i in self.val_labels]
        metrics = {
            f"{metric_key_prefix}_loss": float(-np.log(probs[np.arange(len(probs)), self.val_labels] + 1e-12).mean()),
            f"{metric_key_prefix}_map3": map_at_k(truth, decode_top_k(probs, self.classes, self.val_correct, config.CORRECTNESS_MASK)),
            f"{metric_key_prefix}_map3_unmasked": map_at_k(truth, decode_top_k(probs, self.classes, self.val_correct, False)),
        }
        if metrics[f"{metric_key_prefix}_map3"] > self.best["map3"]:
            self.best = {"map3": metrics[f"{metric_key_prefix}_map3"], "step": self.state.global_step,
                         "map3_unmasked": metrics[f"{metric_key_prefix}_map3_unmasked"]}
            save_adapter(self.model, self.best_map3_dir)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def training_arguments(question_id, n_train, precision):
    steps_per_epoch = math.ceil(n_train / (config.TRAIN_BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS))
    total_steps = steps_per_epoch * config.EPOCHS
    eval_steps = config.EVAL_STEPS if config.EVAL_STEPS >= 1 else max(1, round(config.EVAL_STEPS * total_steps))
    kwargs = dict(
        output_dir=os.path.join(config.get_question_output_dir(question_id), "trainer"),
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


def train_question(question_id, rows, tokenizer, base_model, precision):
    """Train one question; return its results (the summary entry). The base model is left clean."""
    out_dir = config.get_question_output_dir(question_id)
    encoder = fit_label_encoder(rows[TARGET_COLUMN], config.get_question_label_encoder_path(question_id))
    classes = list(encoder.classes_)
    result = {"question_id": question_id, "classes": classes, "num_classes": len(classes),
              "label_counts": rows[TARGET_COLUMN].value_counts().to_dict(), "rows": len(rows)}
    if len(classes) <= 1:
        message = f"Warning: Question {question_id} has only {len(classes)} class(es). Skipping..."
        print(message, flush=True)
        return {**result, "status": "skipped", "reason": message}

    train_idx, val_idx = split_rows(rows, config.SEED)
    input_ids, prompt_stats = encode_prompts(rows, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    log.info("question %s: %d rows (%d train, %d val), %d classes; prompt tokens mean %.0f p95 %.0f max %d, "
             "context shortened in %d rows", question_id, len(rows), len(train_idx), len(val_idx), len(classes),
             prompt_stats["mean_tokens"], prompt_stats["p95_tokens"], prompt_stats["max_tokens"], prompt_stats["shortened"])
    labels = encoder.transform(rows[TARGET_COLUMN])
    correct = correctness_of(rows)

    set_seed(config.SEED)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=config.LORA_RANK, lora_alpha=config.LORA_ALPHA,
        lora_dropout=config.LORA_DROPOUT, target_modules=config.LORA_TARGET_MODULES,
    )
    model = attach_lora(base_model, lora_config, len(classes))
    try:
        collator = build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF)
        trainer = MapTrainer(
            model=model,
            args=training_arguments(question_id, len(train_idx), precision),
            data_collator=collator,
            train_dataset=[{"input_ids": input_ids[i], "labels": int(labels[i])} for i in train_idx],
            eval_dataset=[{"input_ids": input_ids[i], "labels": int(labels[i])} for i in val_idx],
            val_input_ids=[input_ids[i] for i in val_idx],
            val_labels=labels[val_idx],
            val_correct=[correct[i] for i in val_idx],
            classes=classes,
            precision=precision,
            best_map3_dir=os.path.join(out_dir, "best_map3"),
        )
        trainer.train()
        evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_map3" in entry]
        final = trainer.evaluate() if not evaluated or evaluated[-1] != trainer.state.global_step else \
            next(e for e in reversed(trainer.state.log_history) if "eval_map3" in e)
        save_adapter(model, os.path.join(out_dir, "best"))
        write_json_atomic(os.path.join(config.get_question_log_dir(question_id), "log_history.json"), trainer.state.log_history)
    finally:
        model.unload()
        shutil.rmtree(os.path.join(out_dir, "trainer"), ignore_errors=True)
    return {
        **result, "status": "succeeded",
        "best_map3": trainer.best["map3"], "best_map3_unmasked": trainer.best["map3_unmasked"],
        "best_step": trainer.best["step"], "final_map3": final["eval_map3"],
        "final_map3_unmasked": final["eval_map3_unmasked"], "steps": trainer.state.global_step,
        "train_rows": len(train_idx), "val_rows": len(val_idx), "prompt_stats": prompt_stats,
    }


def is_complete(question_id):
    """Results exist and, for a trained question, both adapters are on disk."""
    path = config.get_question_results_path(question_id)
    if not os.path.isfile(path):
        return False
    status = read_json(path).get("status")
    out_dir = config.get_question_output_dir(question_id)
    adapters = all(os.path.isfile(os.path.join(out_dir, name, "adapter_config.json")) for name in ("best", "best_map3"))
    return status == "skipped" or (status == "succeeded" and adapters)


def peak_memory_mb(device):
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    return {"peak_rss_mb": rss_kb / 1024, "peak_gpu_memory_mb": gpu}


def run_question(question_id, rows, tokenizer, base_model, precision, device):
    """Train one question with its own log file; a failure is recorded, not raised."""
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
    result.update(seconds=round(time.time() - started, 2), model=config.MODEL_NAME, prompt_version=config.PROMPT_VERSION,
                  max_len=config.MAX_LEN, epochs=config.EPOCHS, learning_rate=config.LEARNING_RATE, **peak_memory_mb(device))
    write_json_atomic(config.get_question_results_path(question_id), result)
    return result


def write_summary(question_ids):
    """Merge every question's results file into all_questions_summary.json (and a plot)."""
    results = {}
    for question_id in question_ids:
        path = config.get_question_results_path(question_id)
        if os.path.isfile(path):
            results[question_id] = read_json(path)
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
        "overall_best_map3": sum(r["best_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "overall_final_map3": sum(r["final_map3"] * r["val_rows"] for r in succeeded) / val_rows if val_rows else None,
        "val_rows": val_rows,
        "seconds": round(sum(r.get("seconds", 0) for r in results.values()), 2),
    }
    write_json_atomic(os.path.join(config.get_summary_dir(), "all_questions_summary.json"), summary)
    return summary


def train(df, question_ids):
    """Train the given questions of a validated frame; return their results."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(config.PRECISION, device)
    tokenizer = load_tokenizer(config.MODEL_NAME)
    base_model = None
    results = {}
    for question_id in question_ids:
        if not config.OVERWRITE and is_complete(question_id):
            log.info("question %s: results complete, skipping (use --overwrite to retrain)", question_id)
            results[question_id] = read_json(config.get_question_results_path(question_id))
            continue
        if base_model is None:
            log.info("loading %s (%s on %s)", config.MODEL_NAME, precision, device)
            base_model = load_base_model(config.MODEL_NAME, tokenizer, TORCH_DTYPES[precision], device)
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        results[question_id] = run_question(question_id, rows, tokenizer, base_model, precision, device)
        log.info("question %s: %s", question_id, {k: results[question_id].get(k) for k in ("status", "best_map3", "final_map3", "seconds", "error")})
    return results


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], SETTINGS, argv)
    setup_logging()
    try:
        if config.DEMO:
            from demo.synthetic import prepare_demo
            prepare_demo()
        df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
        absent = [q for q in config.QUESTION_IDS if q not in set(df["QuestionId"])]
        if absent:
            raise InputError(f"{config.TRAIN_DATA_PATH}: no rows for QuestionId {', '.join(map(str, absent))}")
        results = train(df, config.QUESTION_IDS)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = write_summary(config.QUESTION_IDS)
    log.info("summary: %d succeeded, %d failed, %d skipped; overall validation MAP@3 %s",
             summary["succeeded"], summary["failed"], summary["skipped"], summary["overall_best_map3"])
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
