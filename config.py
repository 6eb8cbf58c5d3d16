"""Every setting of the system, each with its one default.

Scripts override any of them from the command line (`python train.py --epochs 5`); `parse_args` builds the
argparse parser from the names below and writes the parsed values back into this module, so the rest of
the code reads `config.X` and sees the override.
"""
import argparse
import os
import sys

from prompt_utils import questions

# Model and data
MODEL_NAME = "Qwen/Qwen3-0.6B"
TRAIN_DATA_PATH = "/kaggle/input/map-charting-student-math-misunderstandings/train.csv"
TEST_DATA_PATH = "/kaggle/input/map-charting-student-math-misunderstandings/test.csv"
OUTPUT_DIR = "ver_2"
SUBMISSION_PATH = "submission.csv"
QUESTION_IDS = list(questions)

# Prompt
PROMPT_VERSION = "create_prompt_v1"
MAX_LEN = 300

# Training
EPOCHS = 3
TRAIN_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 32
GRADIENT_ACCUMULATION_STEPS = 1
LEARNING_RATE = 2e-4
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
LR_SCHEDULER = "linear"
LABEL_SMOOTHING = 0.0
CLASS_WEIGHT_POWER = 0.0
DUPLICATES = "keep"
VAL_FRACTION = 0.2
SEED = 42
EVAL_STEPS = 0.1
LOGGING_STEPS = 10
GRADIENT_CHECKPOINTING = False
PAD_TO_MULTIPLE_OF = 0
PRECISION = "auto"
OVERWRITE = False
FOLDS = 1

# LoRA
LORA_RANK = 64
LORA_ALPHA = 128
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = ["q_proj", "v_proj", "k_proj", "o_proj"]

# Parallel runs
GPUS = "all"
WORKERS = 0
SHARD = "1/1"
SUMMARIZE_ONLY = False

# Inference
CHECKPOINT = "best_map3"
CORRECTNESS_MASK = True
MERGE_LORA = True
ALLOW_FALLBACK = False

# Experiment tracking
USE_WANDB = False
WANDB_PROJECT = "map-question-specific"

# Demo
DEMO = False
DEMO_OUTPUT_DIR = "ver_demo"
# A tiny random-init model learns from a short prompt at a high learning rate: --demo applies these to
# every setting not given on the command line.
DEMO_SETTINGS = {"LEARNING_RATE": 5e-3, "EPOCHS": 8}

HELP = {
    "MODEL_NAME": "base model: a local directory (or a hub id when online)",
    "TRAIN_DATA_PATH": "competition train.csv",
    "TEST_DATA_PATH": "competition test.csv",
    "OUTPUT_DIR": "where question_<id>/ and summary/ are written",
    "SUBMISSION_PATH": "submission file to write",
    "QUESTION_IDS": "comma-separated QuestionIds to process (default: all 15)",
    "PROMPT_VERSION": "prompt builder from prompts.PROMPTS",
    "MAX_LEN": "token budget of a prompt; context is shortened to fit, the explanation never",
    "EPOCHS": "training epochs per question",
    "TRAIN_BATCH_SIZE": "training batch size per device",
    "EVAL_BATCH_SIZE": "evaluation/inference batch size",
    "GRADIENT_ACCUMULATION_STEPS": "batches accumulated per optimizer step",
    "LEARNING_RATE": "peak learning rate",
    "WEIGHT_DECAY": "AdamW weight decay",
    "WARMUP_RATIO": "fraction of the optimizer steps spent warming up",
    "LR_SCHEDULER": "transformers learning-rate schedule name",
    "LABEL_SMOOTHING": "label smoothing of the training loss (0: none)",
    "CLASS_WEIGHT_POWER": "weight each class's loss by (rows / class rows) ** power (0: unweighted, 1: balanced)",
    "DUPLICATES": "training rows that repeat a text with different labels: keep, drop, or majority (relabel to the "
                  "group's most common label; a tie drops the group); validation rows are never changed",
    "VAL_FRACTION": "fraction of each question's rows held out for validation",
    "SEED": "random seed (split, head init, data order)",
    "EVAL_STEPS": "evaluate every N optimizer steps; a value below 1 is a fraction of the run",
    "LOGGING_STEPS": "log the training loss every N steps",
    "GRADIENT_CHECKPOINTING": "trade compute for memory (for OOM on small GPUs)",
    "PAD_TO_MULTIPLE_OF": "pad batches to a multiple of this many tokens (0: longest row only)",
    "PRECISION": "auto (bf16 where supported, fp16 on other GPUs, fp32 on CPU), bf16, fp16 or fp32",
    "OVERWRITE": "retrain questions whose results already exist",
    "FOLDS": "1: one train/validation split; K > 1: K-fold with out-of-fold predictions and a fold ensemble",
    "GPUS": "GPUs to use, e.g. 0,1 (all: every visible GPU); one worker process per GPU",
    "WORKERS": "worker processes (0: one per GPU, 1 on CPU)",
    "SHARD": "K/N: train only the K-th of N size-balanced partitions of the questions",
    "SUMMARIZE_ONLY": "only rebuild the summary from the question results on disk",
    "LORA_RANK": "LoRA rank r",
    "LORA_ALPHA": "LoRA alpha",
    "LORA_DROPOUT": "LoRA dropout",
    "LORA_TARGET_MODULES": "comma-separated module names LoRA adapts",
    "CHECKPOINT": "adapter to load: best_map3 (best validation MAP@3) or best (final)",
    "CORRECTNESS_MASK": "rank labels whose True_/False_ prefix matches the chosen answer's correctness first",
    "MERGE_LORA": "fold LoRA into the base weights while predicting a question (the base is restored exactly)",
    "ALLOW_FALLBACK": "exit 0 even when a question with a trained model (or without training results) was predicted "
                      "by label frequencies",
    "USE_WANDB": "log each question as a wandb run (one group per output dir)",
    "WANDB_PROJECT": "wandb project name",
    "DEMO": "run on generated data with a tiny random Qwen3 (no downloads needed)",
    "DEMO_OUTPUT_DIR": "output directory of --demo",
}

FLAGS = {
    "MODEL_NAME": "--model",
    "TRAIN_DATA_PATH": "--train-data",
    "TEST_DATA_PATH": "--test-data",
    "OUTPUT_DIR": "--output-dir",
    "SUBMISSION_PATH": "--submission",
    "QUESTION_IDS": "--questions",
    "PROMPT_VERSION": "--prompt-version",
    "MAX_LEN": "--max-len",
    "EPOCHS": "--epochs",
    "TRAIN_BATCH_SIZE": "--batch-size",
    "EVAL_BATCH_SIZE": "--eval-batch-size",
    "GRADIENT_ACCUMULATION_STEPS": "--grad-accum",
    "LEARNING_RATE": "--lr",
    "WEIGHT_DECAY": "--weight-decay",
    "WARMUP_RATIO": "--warmup-ratio",
    "LR_SCHEDULER": "--lr-scheduler",
    "LABEL_SMOOTHING": "--label-smoothing",
    "CLASS_WEIGHT_POWER": "--class-weight-power",
    "DUPLICATES": "--duplicates",
    "VAL_FRACTION": "--val-fraction",
    "SEED": "--seed",
    "EVAL_STEPS": "--eval-steps",
    "LOGGING_STEPS": "--logging-steps",
    "GRADIENT_CHECKPOINTING": "--gradient-checkpointing",
    "PAD_TO_MULTIPLE_OF": "--pad-to-multiple-of",
    "PRECISION": "--precision",
    "OVERWRITE": "--overwrite",
    "FOLDS": "--folds",
    "GPUS": "--gpus",
    "WORKERS": "--workers",
    "SHARD": "--shard",
    "SUMMARIZE_ONLY": "--summarize-only",
    "LORA_RANK": "--lora-rank",
    "LORA_ALPHA": "--lora-alpha",
    "LORA_DROPOUT": "--lora-dropout",
    "LORA_TARGET_MODULES": "--lora-targets",
    "CHECKPOINT": "--checkpoint",
    "CORRECTNESS_MASK": "--correctness-mask",
    "MERGE_LORA": "--merge-lora",
    "ALLOW_FALLBACK": "--allow-fallback",
    "USE_WANDB": "--wandb",
    "WANDB_PROJECT": "--wandb-project",
    "DEMO": "--demo",
    "DEMO_OUTPUT_DIR": "--demo-output-dir",
}

CHOICES = {
    "PRECISION": ["auto", "bf16", "fp16", "fp32"],
    "CHECKPOINT": ["best_map3", "best"],
    "DUPLICATES": ["keep", "drop", "majority"],
}


# Settings given explicitly on the command line (parse_args fills it): --demo leaves those alone.
GIVEN = set()


def get_question_output_dir(question_id):
    return os.path.join(OUTPUT_DIR, f"question_{question_id}")


def get_question_model_path(question_id, checkpoint=None, fold=None):
    """question_<id>/<checkpoint>, or question_<id>/fold_<k>/<checkpoint> in a K-fold run."""
    folder = get_question_output_dir(question_id)
    if fold is not None:
        folder = os.path.join(folder, f"fold_{fold}")
    return os.path.join(folder, checkpoint or CHECKPOINT)


def get_question_label_encoder_path(question_id):
    return os.path.join(get_question_output_dir(question_id), "label_encoder.joblib")


def get_question_log_dir(question_id):
    return os.path.join(get_question_output_dir(question_id), "logs")


def get_summary_dir():
    return os.path.join(OUTPUT_DIR, "summary")


def get_question_results_path(question_id):
    return os.path.join(get_summary_dir(), f"question_{question_id}_results.json")


def _list_of(item_type):
    def parse(text):
        return [item_type(part.strip()) for part in text.split(",") if part.strip()]
    return parse


def _add_setting(parser, name, flag):
    default = globals()[name]
    kwargs = {"dest": name, "default": default, "help": HELP[name]}
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif isinstance(default, list):
        kwargs["type"] = _list_of(type(default[0]))
        kwargs["metavar"] = "A,B,..."
    else:
        kwargs["type"] = type(default)
        kwargs["choices"] = CHOICES.get(name)
    parser.add_argument(flag, **kwargs)


def snapshot():
    """All settings as a dict, e.g. to hand to a worker process."""
    return {name: value for name, value in globals().items() if name.isupper() and name not in ("HELP", "FLAGS", "CHOICES", "GIVEN", "DEMO_SETTINGS")}


def update(settings):
    globals().update(settings)


def parse_args(description, names, argv=None, flags=None, extra_arguments=None):
    """Parse `--flag value` overrides of the settings `names` into this module.

    `flags` renames a setting's flag for one script (submit.py's --batch-size is EVAL_BATCH_SIZE);
    `extra_arguments(parser)` adds script-only arguments. Returns the argparse namespace.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    flags = {**FLAGS, **(flags or {})}
    for name in names:
        _add_setting(parser, name, flags[name])
    if extra_arguments:
        extra_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    update({name: getattr(args, name) for name in names})
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    GIVEN.clear()
    GIVEN.update(name for name in names if {flags[name], "--no-" + flags[name][2:]} & given)
    return args
