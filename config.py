"""Every setting of the system, each declared once: its default, flag, help, choices and the scripts that take it.

A recipe (recipes/*.py) is a small Python file that assigns settings declared here, and STAGES; train.py reads
one (`python train.py recipes/minilm.py --epochs 2`), the command line's flags override it.

`setting(...)` records the declaration in SETTINGS and sets the module variable, so the rest of the code reads
`config.X`. Scripts override any setting they take from the command line (`python train.py --epochs 5`):
`parse_args` builds the argparse parser from SETTINGS and writes the parsed values back into this module.
`python config.py` prints README.md's options table (tests/test_config.py checks that the two agree).

Scripts: train (train.py, tests/validate_system.py, benchmarks/fold_ensemble.py), submit (submit.py),
run and gpu (benchmarks/run.py, benchmarks/gpu.py), baseline and compare_oof (benchmarks/).
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

from prompt_utils import questions


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    flag: str
    help: str
    scripts: tuple
    choices: tuple = None
    flag_in: dict = field(default_factory=dict)  # script -> its own flag (submit.py's --batch-size)

    def flag_for(self, script):
        return self.flag_in.get(script, self.flag)


SETTINGS = {}


def setting(name, default, flag, help, scripts, choices=None, flag_in=None):
    """Declare a setting: `config.<name>` starts at `default`; each script in `scripts` (space-separated) takes `flag`."""
    SETTINGS[name] = Setting(name, default, flag, help, tuple(scripts.split()), choices, flag_in or {})
    globals()[name] = default


# Model and data
setting("MODEL_NAME", "Qwen/Qwen3-0.6B", "--model", "base model: a local directory (or a hub id when online, training "
        "only); submit.py with several --output-dir: one for all or a comma list, one per run (default: each run's recorded model)",
        "train submit run parity")
setting("TRAIN_DATA_PATH", "/kaggle/input/map-charting-student-math-misunderstandings/train.csv", "--train-data",
        "competition train.csv (submit.py: only an ensemble of runs reads it, to fit their weights)",
        "train submit run gpu baseline compare_oof parity")
setting("TEST_DATA_PATH", "/kaggle/input/map-charting-student-math-misunderstandings/test.csv", "--test-data",
        "competition test.csv (train.py: only validate_system.py reads it)", "train submit")
setting("OUTPUT_DIR", "ver_2", "--output-dir", "where question_<id>/, global/ and summary/ are written (submit.py: a "
        "comma list of runs averages them, weights fitted on their out-of-fold files)",
        "train submit baseline parity")
setting("SUBMISSION_PATH", "submission.csv", "--submission", "submission file to write", "submit")
setting("QUESTION_IDS", list(questions), "--questions", "comma-separated QuestionIds to process (default: all 15)",
        "train submit run baseline parity")
setting("SCOPE", "question", "--scope",
        "question: one model per QuestionId (question_<id>/); global: one model over the rows of all selected questions "
        "(global/), its scores restricted to each row's question's labels", "train", choices=("question", "global"))
setting("INIT_FROM", "", "--init-from",
        "output dir of a --scope global run: each question's LoRA and head start from its global model of the same fold "
        "(same --folds, --seed, --label-space)", "train")
setting("LABEL_SPACE", "full", "--label-space",
        "full: train on Category:Misconception; suffix: without the True_/False_ prefix, which decoding restores from "
        "the answer's correctness", "train", choices=("full", "suffix"))

# Prompt
setting("PROMPT_VERSION", "create_prompt_v1", "--prompt-version",
        "prompt builder from prompts.PROMPTS: create_prompt_v1 (answer, correctness, explanation), create_prompt_v2 "
        "(plus question, choices, known misconceptions; 0.044 lower out of fold, see EXPERIMENTS.md) or "
        "create_prompt_global (v1 led by the QuestionId: the default of --scope global and of --init-from)",
        "train run gpu")
setting("MAX_LEN", 300, "--max-len", "token budget of a prompt: create_prompt_v2 drops context to fit; the explanation is never cut, so v1 and the "
        "global prompt are never shortened",
        "train run gpu")

# Training
setting("EPOCHS", 3, "--epochs", "training epochs per question", "train run gpu")
setting("TRAIN_BATCH_SIZE", 32, "--batch-size", "training batch size per device", "train run gpu")
setting("EVAL_BATCH_SIZE", 32, "--eval-batch-size", "evaluation/inference batch size",
        "train submit run gpu parity", flag_in={"submit": "--batch-size"})
setting("GRADIENT_ACCUMULATION_STEPS", 1, "--grad-accum", "batches accumulated per optimizer step", "train")
setting("LEARNING_RATE", 2e-4, "--lr", "peak learning rate", "train")
setting("WEIGHT_DECAY", 0.01, "--weight-decay", "AdamW weight decay", "train")
setting("WARMUP_RATIO", 0.1, "--warmup-ratio", "fraction of the optimizer steps spent warming up", "train")
setting("LR_SCHEDULER", "linear", "--lr-scheduler", "transformers learning-rate schedule name", "train")
setting("HEAD_LR_MULTIPLIER", 1.0, "--head-lr-multiplier",
        "learning rate of a new classification head, as a multiple of --lr (10 kept 31774 on its plateau, see "
        "EXPERIMENTS.md)", "train")
setting("HEAD_INIT", "prior", "--head-init",
        "bias of a new head: prior (log label frequencies of its training rows) or zero", "train", choices=("prior", "zero"))
setting("MAX_GRAD_NORM", 1.0, "--max-grad-norm",
        "clip the gradient norm of LoRA and head together at this value (0: no clipping)", "train")
setting("LABEL_SMOOTHING", 0.0, "--label-smoothing", "label smoothing of the training loss (0: none)", "train")
setting("CLASS_WEIGHT_POWER", 0.0, "--class-weight-power",
        "weight each class's loss by (rows / class rows) ** power (0: unweighted, 1: balanced)", "train")
setting("DUPLICATES", "keep", "--duplicates",
        "training rows that repeat a text with different labels: keep, drop, or majority (relabel to the group's most "
        "common label; a tie drops the group); validation rows are never changed", "train",
        choices=("keep", "drop", "majority"))
setting("VAL_FRACTION", 0.2, "--val-fraction", "fraction of each question's rows held out for validation (--folds 1): m of K stratified folds with m/K the "
        "fraction (K <= 20); a class with a single row stays in training with every row repeating its text",
        "train gpu baseline")
setting("SEED", 42, "--seed", "random seed (split, head init, data order)", "train run gpu baseline")
setting("SEEDS", "", "--seeds", "comma-separated model seeds (head and LoRA init, data order, dropout): each model is "
        "trained once per seed on --seed's split, the first into --output-dir, each other into --output-dir/seed_<s>/; "
        "submit.py averages them (empty: --seed alone)", "train")
setting("EVAL_STEPS", 0.1, "--eval-steps", "evaluate every N optimizer steps; a value below 1 is a fraction of the run",
        "train gpu")
setting("LOGGING_STEPS", 10, "--logging-steps", "log the training loss every N steps", "train")
setting("GRADIENT_CHECKPOINTING", False, "--gradient-checkpointing", "trade compute for memory (for OOM on small GPUs)",
        "train gpu")
setting("PAD_TO_MULTIPLE_OF", 0, "--pad-to-multiple-of", "pad batches to a multiple of this many tokens (0: longest row only)",
        "train submit run gpu parity")
setting("PRECISION", "auto", "--precision", "auto (bf16 from compute capability 8.0, fp16 on older GPUs such as T4, fp32 on CPU), bf16, fp16 or fp32",
        "train submit", choices=("auto", "bf16", "fp16", "fp32"))
setting("CHECKPOINT_EVERY", 1, "--checkpoint-every",
        "write a checkpoint inside each model every N evaluations, from which rerunning the same command resumes a "
        "stopped model (0: none; only the last is kept, and none once the model is saved)", "train")
setting("OVERWRITE", False, "--overwrite", "retrain questions whose results already exist", "train")
setting("FOLDS", 1, "--folds", "1: one train/validation split; K > 1: K-fold with out-of-fold predictions and a fold ensemble",
        "train baseline")
setting("REFIT", False, "--refit",
        "after a model's K folds, train it once more on all its training rows for the epochs the folds chose (mean "
        "step of their best_map3 as a fraction of their steps, times --epochs), into refit/best; needs --folds K > 1",
        "train")

# LoRA
setting("LORA_RANK", 64, "--lora-rank", "LoRA rank r", "train gpu")
setting("LORA_ALPHA", 128, "--lora-alpha", "LoRA alpha", "train gpu")
setting("LORA_DROPOUT", 0.05, "--lora-dropout", "LoRA dropout", "train gpu")
setting("LORA_TARGET_MODULES", ["q_proj", "v_proj", "k_proj", "o_proj"], "--lora-targets",
        "comma-separated module names LoRA adapts (query,key,value,dense for BERT)", "train gpu")

# Parallel runs
setting("GPUS", "all", "--gpus", "GPUs to use, as indices among the visible ones, e.g. 0,1 (all: every visible GPU); one worker process per GPU, "
        "pinned to it", "train")
setting("WORKERS", 0, "--workers", "worker processes (0: one per GPU, 1 on CPU)", "train")
setting("SHARD", "1/1", "--shard", "K/N: train only the K-th of N size-balanced partitions of the questions", "train")
setting("SUMMARIZE_ONLY", False, "--summarize-only", "only rebuild the summary from the question results on disk", "train")

# Inference
setting("CHECKPOINT", "best_map3", "--checkpoint", "adapter to load: best_map3 (best validation MAP@3) or best (final)",
        "submit compare_oof parity", choices=("best_map3", "best"))
setting("CORRECTNESS_MASK", True, "--correctness-mask",
        "rank labels whose True_/False_ prefix matches the chosen answer's correctness first", "train submit parity")
setting("MERGE_LORA", True, "--merge-lora",
        "fold LoRA into the base weights while predicting a question (the base is restored exactly)", "submit")
setting("ALLOW_FALLBACK", False, "--allow-fallback",
        "exit 0 even when a question with a trained model (or without training results) was predicted by label "
        "frequencies", "submit")
setting("PREDICT_WITH", "refit", "--predict-with",
        "which models of a --refit run submit.py averages: folds, refit, or both (the fold models' average and the refit "
        "model at equal weight, i.e. refit 1/2); a run without refit models predicts with its folds (refit: best on "
        "held-out rows, EXPERIMENTS.md)",
        "submit", choices=("folds", "refit", "both"))
setting("GLOBAL_WEIGHT", 0.25, "--global-weight",
        "weight of the global model where both it and a question's model exist (0: question models only, 1: global only)",
        "submit")
setting("ENSEMBLE_WEIGHTS", "", "--ensemble-weights",
        "comma-separated weights of the runs of --output-dir A,B,... instead of fitting them (empty: fit on their "
        "out-of-fold files)", "submit")

# Experiment tracking
setting("USE_WANDB", False, "--wandb", "log each question as a wandb run (one group per output dir)", "train")
setting("WANDB_PROJECT", "map-question-specific", "--wandb-project", "wandb project name", "train")

# Demo
setting("DEMO", False, "--demo", "run on generated data with a tiny random Qwen3 (no downloads needed)", "train submit")
setting("DEMO_OUTPUT_DIR", "ver_demo", "--demo-output-dir", "output directory of --demo", "train submit")
# A tiny random-init model learns from a short prompt at a high learning rate: --demo applies these to
# every setting not given on the command line.
DEMO_SETTINGS = {"LEARNING_RATE": 5e-3, "EPOCHS": 8}

# Settings given explicitly on the command line (parse_args fills it): --demo and recipes leave those alone.
GIVEN = set()

# The recipe `python train.py` reads when none is given.
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "qwen3_0.6b.py")
# Per-question models from scratch: what the benchmarks that measure per-question training run.
SEED_RECIPE = os.path.join(os.path.dirname(DEFAULT_RECIPE), "seed.py")
# The recipe this run read ("" for none): parse_args sets it, results record it.
RECIPE = ""
# The models one train.py run trains one after the other, each stage a dict of the settings it changes (a recipe
# assigns it): [{"SCOPE": "global", "EPOCHS": 4}, {"SCOPE": "question", "EPOCHS": 2}] trains a global model, then
# per-question models started from it. One stage without changes: the run's settings as they are.
STAGES = [{}]


# The id under which the global model's files live, in place of a QuestionId, in the path helpers below.
GLOBAL = "global"
# The member of a K-fold model trained on all its rows (--refit), in place of a fold number in the path helpers below.
REFIT_MODEL = "refit"


def get_question_output_dir(question_id):
    """question_<id>/, or global/ for the model over all questions (question_id GLOBAL)."""
    return os.path.join(OUTPUT_DIR, GLOBAL if question_id == GLOBAL else f"question_{question_id}")


def member_name(fold):
    """The folder of one member of a K-fold model: fold_<k>, or refit (fold REFIT_MODEL)."""
    return REFIT_MODEL if fold == REFIT_MODEL else f"fold_{fold}"


def get_member_dir(question_id, fold=None):
    """question_<id>/ (one split), or the member's folder in it: fold_<k>/ or refit/."""
    folder = get_question_output_dir(question_id)
    return folder if fold is None else os.path.join(folder, member_name(fold))


def get_question_model_path(question_id, checkpoint=None, fold=None):
    """question_<id>/<checkpoint>, or question_<id>/fold_<k>/<checkpoint> in a K-fold run."""
    return os.path.join(get_member_dir(question_id, fold), checkpoint or CHECKPOINT)


def get_checkpoint_dir(question_id, fold=None):
    """The Trainer's work dir of a model in training, with its checkpoints: question_<id>/[fold_<k>/]trainer."""
    return os.path.join(get_member_dir(question_id, fold), "trainer")


def get_question_label_encoder_path(question_id):
    return os.path.join(get_question_output_dir(question_id), "label_encoder.joblib")


def get_question_log_dir(question_id):
    return os.path.join(get_question_output_dir(question_id), "logs")


def get_summary_dir():
    return os.path.join(OUTPUT_DIR, "summary")


def get_question_results_path(question_id):
    name = "global_results.json" if question_id == GLOBAL else f"question_{question_id}_results.json"
    return os.path.join(get_summary_dir(), name)


def model_seed():
    """The seed of the models this process trains: the first of --seeds (a seeds run gives each of its runs its own
    seed there), else --seed."""
    return int(SEEDS.split(",")[0]) if SEEDS else SEED


def snapshot():
    """All settings as a dict, e.g. to hand to a worker process."""
    return {name: globals()[name] for name in SETTINGS}


def update(settings):
    globals().update(settings)


def settings_of(script):
    """The settings a script takes, in declaration order."""
    return [entry for entry in SETTINGS.values() if script in entry.scripts]


def _list_of(item_type):
    def parse(text):
        return [item_type(part.strip()) for part in text.split(",") if part.strip()]
    return parse


def _add_setting(parser, entry, flag):
    # argparse formats help with %: a literal one must be doubled.
    kwargs = {"dest": entry.name, "default": entry.default, "help": entry.help.replace("%", "%%")}
    if isinstance(entry.default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif isinstance(entry.default, list):
        kwargs["type"] = _list_of(type(entry.default[0]))
        kwargs["metavar"] = "A,B,..."
    else:
        kwargs["type"] = type(entry.default)
        kwargs["choices"] = entry.choices
    parser.add_argument(flag, **kwargs)


def _fits(value, default):
    """Whether a recipe's value has the type of the setting's default (an int where a float is expected too)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(item, type(default[0])) for item in value)
    return isinstance(value, type(default))


def read_recipe(path, script):
    """{setting: value} that the recipe file at `path` assigns, STAGES included; ValueError naming the file and
    the name for anything that is not a setting `script` takes, or a value of the wrong type."""
    namespace = {}
    with open(path) as handle:
        exec(compile(handle.read(), path, "exec"), namespace)
    assigned = {name: value for name, value in namespace.items() if not name.startswith("_")}
    names = {entry.name for entry in settings_of(script)}

    def check(settings, where):
        for name, value in settings.items():
            if name not in names:
                raise ValueError(f"{path}: {where}{name} is not a setting of {script} (config.py declares them)")
            if not _fits(value, SETTINGS[name].default) or (SETTINGS[name].choices and value not in SETTINGS[name].choices):
                raise ValueError(f"{path}: {where}{name} = {value!r} does not fit its default {SETTINGS[name].default!r}"
                                 + (f" (choices: {', '.join(SETTINGS[name].choices)})" if SETTINGS[name].choices else ""))

    stages = assigned.pop("STAGES", [{}])
    check(assigned, "")
    if not (isinstance(stages, list) and stages and all(isinstance(stage, dict) for stage in stages)):
        raise ValueError(f"{path}: STAGES must be a non-empty list of dicts of settings")
    for number, stage in enumerate(stages, 1):
        check(stage, f"stage {number}: ")
    # Each stage names its scope, so that --scope can pick stages whatever the command line sets.
    stages = [{"SCOPE": assigned.get("SCOPE", SETTINGS["SCOPE"].default), **stage} for stage in stages]
    return {**assigned, "STAGES": stages}


def parse_args(description, script, argv=None, extra_arguments=None, recipe=None):
    """Parse `--flag value` overrides of the settings `script` takes into this module.

    With `recipe` (the default recipe's path), a first argument ending in .py names the recipe to read instead;
    what it assigns overrides the defaults, and the command line's flags override it. `extra_arguments(parser)`
    adds script-only arguments. Returns the argparse namespace.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    if recipe:
        parser.add_argument("recipe", nargs="?", default=recipe,
                            help="recipe file: settings and STAGES (recipes/seed.py: per-question models only)")
    entries = settings_of(script)
    for entry in entries:
        _add_setting(parser, entry, entry.flag_for(script))
    if extra_arguments:
        extra_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    GIVEN.clear()
    GIVEN.update(entry.name for entry in entries
                 if {entry.flag_for(script), "--no-" + entry.flag_for(script)[2:]} & given)
    recipe_settings = {}
    if recipe:
        try:
            recipe_settings = read_recipe(args.recipe, script)
        except (OSError, SyntaxError, ValueError) as error:
            parser.error(f"recipe {args.recipe}: {error}" if not isinstance(error, ValueError) else str(error))
    update({entry.name: recipe_settings[entry.name] if entry.name in recipe_settings and entry.name not in GIVEN
            else getattr(args, entry.name) for entry in entries})
    update({"STAGES": recipe_settings.get("STAGES", [{}]), "RECIPE": args.recipe if recipe else ""})
    return args


def stage_settings(stage, base):
    """The settings of one stage: the run's (`base`), changed by the stage except where the command line (or
    --demo, whose tiny model needs its rates) set them."""
    kept = GIVEN | (set(DEMO_SETTINGS) if base.get("DEMO") else set())
    return {**base, **{name: value for name, value in stage.items() if name not in kept}}


def options_table():
    """README.md's options table, one row per setting."""
    def shown(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        if value == "":
            return "(none)"
        return "`" + (",".join(map(str, value)) if isinstance(value, list) else str(value)) + "`"

    lines = ["| flag | setting | default | scripts | meaning |", "|---|---|---|---|---|"]
    for entry in SETTINGS.values():
        flags = [f"`{entry.flag}`"] + [f"`{flag}` ({script})" for script, flag in entry.flag_in.items()]
        if isinstance(entry.default, bool):
            flags.append(f"`--no-{entry.flag[2:]}`")
        flag_text = " / ".join(flags)
        choices = f" (choices: {', '.join(entry.choices)})" if entry.choices else ""
        lines.append(f"| {flag_text} | {entry.name} | {shown(entry.default)} | {' '.join(entry.scripts)} | {entry.help}{choices} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
