"""One model's fine-tuning on one split: the Trainer validated by MAP@3, its arguments, optimizer and loss, and the
checkpoints inside a model from which the same command goes on after a stop.

train.py chooses the models, their rows and splits; `train_fold` fine-tunes one of them on one split.

A checkpoint in <model dir>/[fold_<k>/ or refit/]trainer/ is what the Trainer writes in checkpoint-<step>/ (LoRA and head,
optimizer, scheduler, gradient scaler, RNG states, step and log history), completed by CheckpointState in
resume-<step>/ with what the Trainer does not keep: the best MAP@3 so far, its step and adapter, the validation
probabilities, the step-0 evaluation and what the model is made from (a model without validation rows, the refit
model of --refit, has only the last). The Trainer skips the batches already
trained, and the bucketed batch order depends only on the seed and the epoch (LengthGroupedBatches), so a resumed
model sees the batches the uninterrupted one would have.
"""
import glob
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import config
import report
import ranks
from data_collator import LengthGroupedBatches, build_data_collator
from utils import (HEAD_NAMES, TARGET_COLUMN, attach_lora, attach_lora_from, decode_top_k, label_probabilities, log,
                   map_at_k, predict_logits, question_label_mask, read_json, softmax, write_json_atomic)

# An fp16 run's gradient scaler starts at 2**16 and halves at each overflow, skipping that step, until the scale fits
# (at most 16 steps), then tries doubling it every 2,000 steps (a skipped step each time it is too large). More
# steps than this with non-finite gradients is not scaling: the model fails. In bf16 and fp32 nothing skips such a
# step, and it writes NaN into the weights: one fails the model.
FP16_NONFINITE_STEPS = 16
FP16_NONFINITE_STEPS_PER_1000 = 1


def nonfinite_allowance(precision, steps):
    """How many optimizer steps with non-finite gradients a model of `steps` steps may have."""
    return FP16_NONFINITE_STEPS + FP16_NONFINITE_STEPS_PER_1000 * steps // 1000 if precision == "fp16" else 0


# Written last, atomically, into a checkpoint's resume-<step>/: a checkpoint without it is one whose save was cut short.
RESUME_STATE = "resume.json"


class NonFiniteTraining(Exception):
    """Training met more optimizer steps with non-finite gradients than its precision allows."""


def class_weights(labels, num_classes, power):
    """Loss weight per class, (rows / class rows) ** power, scaled so the mean weight over the rows is 1."""
    counts = np.bincount(labels, minlength=num_classes)
    weights = (len(labels) / np.maximum(counts, 1)) ** power
    return torch.tensor(weights / weights[labels].mean(), dtype=torch.float32)


def training_loss(weights, rows_per_step):
    """Cross-entropy with class weights and label smoothing, summed over the rows and divided by the nominal
    rows per optimizer step (batch size x accumulation): the batches vary in size (LengthGroupedBatches), and
    every row weighs the same wherever it lands. Data-parallel, the rows are one process's (--batch-size per
    process) and DDP averages the processes' gradients, so a step's gradient is the sum over the global batch divided
    by the nominal global rows, as one process with the global batch computes it."""
    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        total = F.cross_entropy(logits, labels, weight=weights.to(logits.device), label_smoothing=config.LABEL_SMOOTHING,
                                reduction="sum")
        return total / rows_per_step
    return loss


def replace_directory(path, write):
    """Replace `path` by what `write(folder)` writes, never leaving a half-written directory."""
    staging = path + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def save_adapter(model, path):
    """Replace `path` by the model's adapter and head."""
    replace_directory(path, model.save_pretrained)


@dataclass
class ModelData:
    """What one model trains and is validated on: one question's rows, or all selected questions' (global)."""
    rows: pd.DataFrame
    input_ids: list
    classes: list  # the model's labels: Category:Misconception, or their suffixes (--label-space suffix)
    labels: np.ndarray  # class index of each row
    train_labels: np.ndarray  # the same after the --duplicates policy
    trainable: np.ndarray  # False: left out of training by the --duplicates policy
    correct: list  # whether each row's answer is correct (True/False/None)
    allowed: np.ndarray = None  # rows x classes: the labels of each row's question (global model), None: all
    question_classes: dict = None  # QuestionId -> its classes (global model)

    def probabilities(self, logits, index):
        """(full labels, probabilities) of the rows `index` from the model's logits for them."""
        allowed = None if self.allowed is None else self.allowed[index]
        return label_probabilities(logits, self.classes, [self.correct[i] for i in index], allowed)

    def label_mask(self, index, labels):
        """Rows `index` x full `labels`: the labels a row's question can have, None when all can (a question's model)."""
        if self.question_classes is None:
            return None
        return question_label_mask(self.rows["QuestionId"].to_numpy()[index], labels, self.question_classes)


class MapTrainer(Trainer):
    """A Trainer whose evaluation is the competition's MAP@3, computed as submit.py predicts.

    Every evaluation that beats the best MAP@3 so far rewrites `best_map3_dir`. Without validation rows (the refit
    model) nothing is evaluated, and nothing is kept of evaluations.
    """
    progress = None  # the run's report.RunProgress (set by train.train_questions): a bar over steps, models counted

    def __init__(self, *args, data, val_idx, precision, best_map3_dir, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)  # evaluate() logs each evaluation once; the printed dicts repeated it
        if self.progress is not None:
            self.add_callback(report.StepBar(self.progress))
        self.data = data
        self.val_idx = val_idx
        self.precision = precision
        self.best_map3_dir = best_map3_dir
        self.best = {"map3": -1.0}
        self.best_probs = self.last_probs = None
        self.initial = None  # the evaluation at step 0
        self.nonfinite_steps = 0  # optimizer steps whose gradients were not all finite (NonFiniteSteps)

    @property
    def validated(self):
        """Whether the model has validation rows (the refit model has none)."""
        return len(self.val_idx) > 0

    def get_train_dataloader(self):
        """Batches of rows of similar length, of varying size, in a shuffled order (LengthGroupedBatches), padded by
        the collator; data-parallel, this rank's share of each batch of the global size."""
        batches = LengthGroupedBatches([len(row["input_ids"]) for row in self.train_dataset],
                                       self.args.train_batch_size * ranks.world_size(), self.args.seed, ranks.rank(),
                                       ranks.world_size())
        loader = EpochDataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator,
                                 num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        # accelerate would deal whole batches to the ranks (BatchSamplerShard), some of them twice to even out
        # the count: the sampler already gives each rank its share. The Trainer moves each batch to the device.
        return loader if ranks.is_distributed() else self.accelerator.prepare(loader)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        started = time.perf_counter()
        data, val_idx = self.data, self.val_idx
        # Each rank predicts its share of the rows; every rank then holds all of them, and decides the same.
        logits = ranks.gather_shares(predict_logits(self.model, [data.input_ids[i] for i in ranks.share(val_idx)],
                                                    self.data_collator, self.args.per_device_eval_batch_size,
                                                    self.precision))
        labels, probs = data.probabilities(logits, val_idx)
        self.last_probs = probs
        allowed = None if data.allowed is None else data.allowed[val_idx]
        model_probs = softmax(logits if allowed is None else np.where(allowed, logits, -np.inf))
        loss = float(-np.log(model_probs[np.arange(len(val_idx)), data.labels[val_idx]] + 1e-12).mean())
        truth = data.rows[TARGET_COLUMN].to_numpy()[val_idx]
        correct = [data.correct[i] for i in val_idx]
        label_mask = data.label_mask(val_idx, labels)
        map3 = map_at_k(truth, decode_top_k(probs, labels, correct, config.CORRECTNESS_MASK, allowed=label_mask))
        map3_unmasked = map_at_k(truth, decode_top_k(probs, labels, correct, False, allowed=label_mask))
        log.info("step %d: validation MAP@3 %.4f (unmasked %.4f), loss %.4f", self.state.global_step, map3, map3_unmasked, loss)
        if map3 > self.best["map3"]:
            self.best = {"map3": map3, "map3_unmasked": map3_unmasked, "step": self.state.global_step}
            self.best_probs = probs
            if ranks.is_main():
                save_adapter(self.model, self.best_map3_dir)
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_map3": map3,
                   f"{metric_key_prefix}_map3_unmasked": map3_unmasked,
                   f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_resume_state(self, checkpoint, inputs):
        """Complete a checkpoint the Trainer wrote with what it does not keep; RESUME_STATE last."""
        folder = resume_state_dir(checkpoint)
        if self.validated:
            shutil.copytree(self.best_map3_dir, os.path.join(folder, "best_map3"), dirs_exist_ok=True)
            np.savez(os.path.join(folder, "probabilities.npz"), best_map3=self.best_probs, best=self.last_probs)
        write_json_atomic(os.path.join(folder, RESUME_STATE), {**inputs, "best": self.best, "initial": self.initial,
                                                               "nonfinite_steps": self.nonfinite_steps})

    def restore_resume_state(self, checkpoint):
        """Take up the best MAP@3 so far (its adapter back in best_map3_dir), the validation probabilities and the
        step-0 evaluation from a checkpoint; the Trainer restores the rest."""
        folder = resume_state_dir(checkpoint)
        state = read_json(os.path.join(folder, RESUME_STATE))
        self.best, self.initial = state["best"], state["initial"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)  # checkpoints written before it was recorded lack it
        if not self.validated:
            return
        with np.load(os.path.join(folder, "probabilities.npz")) as stored:
            self.best_probs, self.last_probs = stored["best_map3"], stored["best"]
        if ranks.is_main():
            replace_directory(self.best_map3_dir, lambda staging: shutil.copytree(os.path.join(folder, "best_map3"), staging))

    def validation_scores(self):
        """The MAP@3 at step 0, at the best evaluation and at the last step (evaluated now if the last evaluation
        was earlier), the step-0 evaluation put first in the log history (train() began a new one)."""
        self.state.log_history.insert(0, {**self.initial, "step": 0, "epoch": 0.0})
        evaluated = [entry["step"] for entry in self.state.log_history if "eval_map3" in entry]
        if evaluated[-1] != self.state.global_step:
            self.evaluate()
        final = next(entry for entry in reversed(self.state.log_history) if "eval_map3" in entry)
        return {"initial_map3": self.initial["eval_map3"], "best_map3": self.best["map3"],
                "best_map3_unmasked": self.best["map3_unmasked"], "best_step": self.best["step"],
                "final_map3": final["eval_map3"], "final_map3_unmasked": final["eval_map3_unmasked"]}


class EpochDataLoader(DataLoader):
    """A DataLoader that passes the Trainer's set_epoch on to its batch sampler, as accelerate's prepared one does."""

    def set_epoch(self, epoch):
        self.batch_sampler.set_epoch(epoch)


class NonFiniteSteps(TrainerCallback):
    """Counts the optimizer steps whose gradients are not all finite, which the Trainer's log hides (it logs the
    running loss instead of a NaN one, logging_nan_inf_filter): skipped by the fp16 gradient scaler, or, in bf16 and
    fp32, steps that write NaN into the weights. Past nonfinite_allowance, training stops."""

    def __init__(self, trainer, allowance):
        self.trainer = trainer
        self.allowance = allowance

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        gradients = [parameter.grad for parameter in self.trainer.model.parameters() if parameter.grad is not None]
        if gradients and not torch.stack([gradient.isfinite().all() for gradient in gradients]).all():
            self.trainer.nonfinite_steps += 1
            log.warning("step %d: non-finite gradients (%d so far)", state.global_step + 1, self.trainer.nonfinite_steps)
            if self.trainer.nonfinite_steps > self.allowance:
                control.should_training_stop = True
        return control


class CheckpointState(TrainerCallback):
    """After the Trainer writes a checkpoint: completes it (MapTrainer.save_resume_state), then deletes every other
    checkpoint of the model, so one complete checkpoint is always on disk."""

    def __init__(self, trainer, inputs):
        self.trainer = trainer
        self.inputs = inputs

    def on_save(self, args, state, control, **kwargs):
        # Each rank writes its RNG state into the checkpoint: rank 0 completes it once all have.
        ranks.barrier()
        if ranks.is_main():
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.trainer.save_resume_state(checkpoint, self.inputs)
            remove_all_but(args.output_dir, checkpoint)


def checkpoint_step(checkpoint):
    """The step of a checkpoint-<step>/ folder."""
    return int(checkpoint.rsplit("-", 1)[1])


def resume_state_dir(checkpoint):
    """resume-<step>/ beside the Trainer's checkpoint-<step>/: not inside it, where the Trainer would load the copy of
    best_map3/ as a second adapter."""
    return os.path.join(os.path.dirname(checkpoint), f"resume-{checkpoint_step(checkpoint)}")


def remove_all_but(work_dir, checkpoint):
    """Delete every checkpoint in a model's Trainer work dir but `checkpoint` (None: all of them)."""
    kept = {checkpoint, resume_state_dir(checkpoint)} if checkpoint else set()
    for path in glob.glob(os.path.join(work_dir, "*")):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints(work_dir):
    """The checkpoints in a model's Trainer work dir whose save finished, oldest step first."""
    found = glob.glob(os.path.join(work_dir, f"{PREFIX_CHECKPOINT_DIR}-*"))
    return sorted((path for path in found if os.path.isfile(os.path.join(resume_state_dir(path), RESUME_STATE))),
                  key=checkpoint_step)


def input_changes(recorded, current):
    """Why a model recorded with the inputs `recorded` (a result, a finished fold or a checkpoint) is not made from
    `current` (train.model_inputs): [] when it is."""
    settings = recorded.get("training_settings")
    if settings is None:
        return ["no recorded training settings"]
    reasons = [f"{config.SETTINGS[name].flag} {settings.get(name)} -> {value}"
               for name, value in current["training_settings"].items() if settings.get(name) != value]
    if recorded.get("rows_hash") != current["rows_hash"]:
        reasons.append("other rows (--train-data or --questions changed)")
    # Recorded since --seeds; before, the model seed was --seed.
    recorded_seed = recorded.get("model_seed", settings.get("SEED"))
    if recorded_seed != current["model_seed"]:
        reasons.append(f"model seed {recorded_seed} -> {current['model_seed']}")
    if recorded.get("init_from_hash") != current["init_from_hash"]:
        reasons.append("another starting model (--init-from, or its global model retrained)")
    # --batch-size is per process: other processes, another global batch and number of steps. Recorded since torchrun.
    if recorded.get("processes", 1) != current["processes"]:
        reasons.append(f"processes {recorded.get('processes', 1)} -> {current['processes']}")
    return reasons


def resumable_checkpoint(work_dir, inputs, name):
    """The last complete checkpoint in `work_dir` if made from `inputs`, else None; any other checkpoint is deleted
    (one made from other inputs saying why)."""
    complete = complete_checkpoints(work_dir)
    latest = complete[-1] if complete and not config.OVERWRITE else None
    if latest:
        changes = input_changes(read_json(os.path.join(resume_state_dir(latest), RESUME_STATE)), inputs)
        if changes:
            log.info("%s: its checkpoint %s was made with other inputs (%s), starting over", name, latest, ", ".join(changes))
            latest = None
    remove_all_but(work_dir, latest)
    return latest


def total_steps(n_train, epochs):
    """Optimizer steps of a model trained on n_train rows (by all processes together) for `epochs` (a float for the
    refit model: the Trainer rounds its steps up)."""
    rows_per_step = config.TRAIN_BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS * ranks.world_size()
    return math.ceil(math.ceil(n_train / rows_per_step) * epochs)


def training_arguments(output_dir, n_train, precision, epochs, validated=True):
    """The Trainer's arguments; without validation rows (`validated` False) it never evaluates, and checkpoints at
    the steps where it would have."""
    steps = total_steps(n_train, epochs)
    eval_steps = int(config.EVAL_STEPS if config.EVAL_STEPS >= 1 else max(1, round(config.EVAL_STEPS * steps)))
    kwargs = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=config.TRAIN_BATCH_SIZE,
        per_device_eval_batch_size=config.EVAL_BATCH_SIZE,
        gradient_accumulation_steps=config.GRADIENT_ACCUMULATION_STEPS,
        learning_rate=config.LEARNING_RATE,
        weight_decay=config.WEIGHT_DECAY,
        # An int count: transformers 4.x reads a float warmup_steps as a step count, 5.x as a ratio.
        warmup_steps=math.ceil(config.WARMUP_RATIO * steps),
        lr_scheduler_type=config.LR_SCHEDULER,
        eval_strategy="steps" if validated else "no",
        eval_steps=eval_steps,
        # Saved right after an evaluation, so a checkpoint holds the best MAP@3 up to its own step.
        save_strategy="steps" if config.CHECKPOINT_EVERY else "no",
        save_steps=eval_steps * max(1, config.CHECKPOINT_EVERY),
        max_grad_norm=config.MAX_GRAD_NORM,
        logging_steps=config.LOGGING_STEPS,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        report_to=["wandb"] if config.USE_WANDB else "none",
        seed=config.model_seed(),
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    if ranks.is_distributed():
        # Every LoRA weight and the head take part in each forward pass: DDP need not search the graph for unused ones.
        kwargs["ddp_find_unused_parameters"] = False
    if "average_tokens_across_devices" in TrainingArguments.__dataclass_fields__:
        # training_loss scales the loss itself; transformers 5 would multiply it by the processes again.
        kwargs["average_tokens_across_devices"] = False
    if config.GRADIENT_CHECKPOINTING:
        # Non-reentrant: reentrant checkpointing gives LoRA no gradient when the layers' inputs need none (a frozen
        # embedding's). transformers 5 renamed the arguments (the old names warn); 4.51 knows only the old ones.
        name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
            else "gradient_checkpointing"
        kwargs.update({name: True, f"{name}_kwargs": {"use_reentrant": False}})
    return TrainingArguments(**kwargs)


def build_optimizer(model, head_lr_multiplier):
    """AdamW with the head at head_lr_multiplier times the LoRA learning rate (the scheduler scales both)."""
    groups = {True: [], False: []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[bool(set(name.split(".")) & set(HEAD_NAMES))].append(parameter)
    return torch.optim.AdamW([
        {"params": groups[False], "lr": config.LEARNING_RATE},
        {"params": groups[True], "lr": config.LEARNING_RATE * head_lr_multiplier},
    ], lr=config.LEARNING_RATE, weight_decay=config.WEIGHT_DECAY)


def log_prior(labels, num_classes):
    """Log label frequencies (add-one smoothed): a head starting there predicts the prior from step 0."""
    counts = np.bincount(labels, minlength=num_classes) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def train_fold(question_id, fold, data, train_idx, val_idx, backbone, inputs, init=None, epochs=None):
    """Fine-tune on train_idx, evaluate on val_idx; save best_map3/ and best/. The base model is left clean.

    `inputs` (train.model_inputs) is what the model is made from: a checkpoint made from the same inputs is resumed,
    and the checkpoints are deleted once the model is saved. `init` = (adapter dir, head rows) starts from a saved
    adapter (--init-from) instead of a fresh one. `epochs` (default --epochs) may be a float. An empty val_idx
    (the refit model, fold config.REFIT_MODEL) trains without evaluating and saves best/ only.
    """
    epochs = config.EPOCHS if epochs is None else epochs
    set_seed(config.model_seed())
    if init:
        model = attach_lora_from(backbone.model, *init)
    else:
        lora_config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=config.LORA_RANK, lora_alpha=config.LORA_ALPHA,
            lora_dropout=config.LORA_DROPOUT, target_modules=config.LORA_TARGET_MODULES,
        )
        bias = log_prior(data.train_labels[train_idx], len(data.classes)) if config.HEAD_INIT == "prior" else None
        model = attach_lora(backbone.model, lora_config, len(data.classes), head_bias=bias)
    work_dir = config.get_checkpoint_dir(question_id, fold)
    member = None if fold is None else config.member_name(fold)
    name = report.model_name(question_id) + ("" if member is None else " " + member.replace("_", " "))
    resume = ranks.main_decides(lambda: resumable_checkpoint(work_dir, inputs, name))
    try:
        trainer = MapTrainer(
            model=model,
            args=training_arguments(work_dir, len(train_idx), backbone.precision, epochs, len(val_idx) > 0),
            # Its bound call, not the collator: the Trainer saves a collator's tokenizer into every checkpoint
            # (Qwen3's tokenizer.json is 11 MB), which resuming never reads.
            data_collator=build_data_collator(backbone.tokenizer, config.PAD_TO_MULTIPLE_OF).__call__,
            train_dataset=[{"input_ids": data.input_ids[i], "labels": int(data.train_labels[i])} for i in train_idx],
            eval_dataset=[{"input_ids": data.input_ids[i], "labels": int(data.labels[i])} for i in val_idx],
            compute_loss_func=training_loss(class_weights(data.train_labels[train_idx], len(data.classes), config.CLASS_WEIGHT_POWER),
                                            config.TRAIN_BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS),
            # A head started from a trained model is not new: it learns at the LoRA rate.
            optimizers=(build_optimizer(model, 1.0 if init else config.HEAD_LR_MULTIPLIER), None),
            data=data,
            val_idx=val_idx,
            precision=backbone.precision,
            best_map3_dir=config.get_question_model_path(question_id, "best_map3", fold),
        )
        trainer.add_callback(CheckpointState(trainer, inputs))
        allowance = nonfinite_allowance(backbone.precision, total_steps(len(train_idx), epochs))
        trainer.add_callback(NonFiniteSteps(trainer, allowance))
        if resume:
            trainer.restore_resume_state(resume)
            log.info("%s: resuming from step %d of %d (%s)", name, checkpoint_step(resume),
                     total_steps(len(train_idx), epochs), resume)
        elif trainer.validated:
            trainer.initial = trainer.evaluate()  # step 0: the head's prior, or the model started from
        trainer.train(resume_from_checkpoint=resume)
        if trainer.nonfinite_steps > allowance:
            if ranks.is_main():
                shutil.rmtree(work_dir, ignore_errors=True)  # the same inputs would fail the same way
            raise NonFiniteTraining(
                f"{trainer.nonfinite_steps} optimizer step(s) with non-finite gradients by step {trainer.state.global_step} "
                f"(allowed in {backbone.precision}: {allowance}); try a lower --lr, or --precision bf16 or fp32")
        scores = trainer.validation_scores() if trainer.validated else {}
        if ranks.is_main():
            save_adapter(model, config.get_question_model_path(question_id, "best", fold))
            log_name = "log_history.json" if member is None else f"log_history_{member}.json"
            write_json_atomic(os.path.join(config.get_question_log_dir(question_id), log_name), trainer.state.log_history)
            shutil.rmtree(work_dir, ignore_errors=True)
    finally:
        model.unload()
    return {
        **scores, "steps": trainer.state.global_step, "nonfinite_steps": trainer.nonfinite_steps,
        "train_rows": len(train_idx), "val_rows": len(val_idx),
    }, {"best_map3": trainer.best_probs, "best": trainer.last_probs}
