"""Check the whole setup before a real run: one ✓/✗ line per check, exit code 1 on any ✗.

    python tests/validate_system.py --model /path/to/Qwen3-0.6B --train-data train.csv

Takes the same recipe and overrides as train.py, and checks the settings of each of its stages. ⚠ lines are
warnings: worth reading, not failures.
"""
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import placement  # noqa: E402
import train  # noqa: E402
from utils import InputError, adaptable_layers, load_tokenizer, lora_targets_layer, unmatched_lora_targets  # noqa: E402

PACKAGES = ["torch", "transformers", "peft", "accelerate", "scikit-learn", "pandas", "numpy", "joblib"]
MINIMUM = {"transformers": (4, 51)}


class Checklist:
    def __init__(self):
        self.failures = 0

    def line(self, mark, name, detail):
        print(f"{mark} {name}: {detail}", flush=True)

    def ok(self, name, detail):
        self.line("✓", name, detail)

    def fail(self, name, detail):
        self.failures += 1
        self.line("✗", name, detail)

    def warn(self, name, detail):
        self.line("⚠", name, detail)

    def check(self, name, passed, detail):
        (self.ok if passed else self.fail)(name, detail)


def check_environment(checks):
    checks.check("python", sys.version_info >= (3, 9), platform.python_version())
    for package in PACKAGES + (["wandb"] if config.USE_WANDB else []):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            checks.fail(package, "not installed (pip install -r requirements.txt)")
            continue
        minimum = MINIMUM.get(package)
        too_old = minimum and tuple(int(p) for p in version.split(".")[:2]) < minimum
        checks.check(package, not too_old, version + (f" (needs >= {'.'.join(map(str, minimum))})" if too_old else ""))

    import torch
    from utils import EMULATED_BF16, cpu_emulates_bf16, describe_gpu
    for index in range(torch.cuda.device_count()):
        checks.ok(f"cuda:{index}", describe_gpu(index))
    if not torch.cuda.is_available():
        checks.warn("device", "no CUDA GPU: training runs on the CPU in fp32 (fine for the demo, slow for Qwen3-0.6B)")
    try:
        devices = placement.training_devices()
        for device in dict.fromkeys(devices):
            if device == "cpu" and config.PRECISION == "bf16" and cpu_emulates_bf16():
                checks.warn("precision", f"{precision_and_reason(device)} on {device}: {EMULATED_BF16}")
            else:
                checks.ok("precision", f"{precision_and_reason(device)} on {device}")
    except Exception as error:
        checks.fail("precision", str(error))


def precision_and_reason(device):
    """The precision train.py will use on `device`, and why."""
    from utils import BF16_COMPUTE_CAPABILITY, native_bf16, resolve_precision
    precision = resolve_precision(config.PRECISION, device)
    if config.PRECISION != "auto":
        return f"{precision} (set by --precision)"
    if device == "cpu":
        return f"{precision} (CPU)"
    needed = ".".join(map(str, BF16_COMPUTE_CAPABILITY))
    return f"{precision} (native bf16 from compute capability {needed}: {'yes' if native_bf16(device) else 'no'})"


def check_config(checks):
    from prompts import PROMPTS
    problems = [name for name, good in [
        ("EPOCHS", config.EPOCHS > 0), ("MAX_LEN", config.MAX_LEN > 0), ("TRAIN_BATCH_SIZE", config.TRAIN_BATCH_SIZE > 0),
        ("EVAL_BATCH_SIZE", config.EVAL_BATCH_SIZE > 0), ("GRADIENT_ACCUMULATION_STEPS", config.GRADIENT_ACCUMULATION_STEPS > 0),
        ("LEARNING_RATE", config.LEARNING_RATE > 0), ("VAL_FRACTION", 0 < config.VAL_FRACTION < 1),
        ("LORA_RANK", config.LORA_RANK > 0), ("LORA_ALPHA", config.LORA_ALPHA > 0), ("LORA_DROPOUT", 0 <= config.LORA_DROPOUT < 1),
        ("LABEL_SMOOTHING", 0 <= config.LABEL_SMOOTHING < 1), ("CLASS_WEIGHT_POWER", config.CLASS_WEIGHT_POWER >= 0),
        ("EVAL_STEPS", config.EVAL_STEPS > 0), ("FOLDS", config.FOLDS >= 1), ("PROMPT_VERSION", config.PROMPT_VERSION in PROMPTS),
        ("LORA_TARGET_MODULES", bool(config.LORA_TARGET_MODULES)),
    ] if not good]
    detail = f"invalid {', '.join(f'{name}={getattr(config, name)!r}' for name in problems)}" if problems else \
        f"{config.EPOCHS} epochs, lr {config.LEARNING_RATE}, batch {config.TRAIN_BATCH_SIZE}x{config.GRADIENT_ACCUMULATION_STEPS}, " \
        f"LoRA r{config.LORA_RANK}/α{config.LORA_ALPHA} on {','.join(config.LORA_TARGET_MODULES)}, {config.PROMPT_VERSION}, max_len {config.MAX_LEN}"
    checks.check("config", not problems, detail)


def check_model(checks):
    """Config and tokenizer from local files only; the architecture is built on the meta device (no weights)."""
    from transformers import AutoConfig
    try:
        model_config = AutoConfig.from_pretrained(config.MODEL_NAME, local_files_only=True)
        tokenizer = load_tokenizer(config.MODEL_NAME, offline=True)
        layers = adaptable_layers(config.MODEL_NAME, offline=True)
    except Exception as error:
        checks.fail("model", f"{config.MODEL_NAME}: not loadable offline ({str(error).splitlines()[0]})")
        return None, None
    checks.ok("model", f"{config.MODEL_NAME}: {model_config.model_type}, tokenizer {type(tokenizer).__name__}, "
                       f"chat template {'yes' if getattr(tokenizer, 'chat_template', None) else 'no (plain prompts)'}")
    unmatched = unmatched_lora_targets(layers, config.LORA_TARGET_MODULES)
    checks.check("lora targets", not unmatched, f"not in the model: {', '.join(unmatched)}" if unmatched else
                 f"{', '.join(config.LORA_TARGET_MODULES)} found")
    lora_params = sum(config.LORA_RANK * sum(layer.weight.shape) for name, layer in layers.items()
                      if any(lora_targets_layer(target, name) for target in config.LORA_TARGET_MODULES))
    return tokenizer, lora_params


def check_data(checks, tokenizer):
    from prompts import encode_prompts
    from utils import TARGET_COLUMN, read_competition_csv
    try:
        df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
    except Exception as error:
        checks.fail("train data", str(error))
        return
    checks.ok("train data", f"{config.TRAIN_DATA_PATH}: {len(df)} rows, {df['QuestionId'].nunique()} questions, "
                            f"{df[TARGET_COLUMN].nunique()} labels")
    if os.path.isfile(config.TEST_DATA_PATH):
        try:
            test = read_competition_csv(config.TEST_DATA_PATH, labelled=False)
            checks.ok("test data", f"{config.TEST_DATA_PATH}: {len(test)} rows")
        except Exception as error:
            checks.fail("test data", str(error))
    else:
        checks.warn("test data", f"{config.TEST_DATA_PATH} not found (only submit.py needs it)")

    in_data = set(df["QuestionId"])
    absent = [q for q in config.QUESTION_IDS if q not in in_data]
    checks.check("question ids", not absent, f"not in the data: {absent}" if absent else f"{len(config.QUESTION_IDS)} questions, all in the data")
    extra = sorted(in_data - set(config.QUESTION_IDS))
    if extra:
        checks.warn("question ids", f"in the data but not trained: {extra}")
    classes = df[df["QuestionId"].isin(config.QUESTION_IDS)].groupby("QuestionId")[TARGET_COLUMN].nunique()
    single = classes[classes <= 1].index.tolist()
    if single:
        checks.warn("classes", f"questions {single} have one class and will be skipped")
    else:
        checks.ok("classes", f"{classes.min()}-{classes.max()} labels per question")

    if tokenizer is None:
        return
    rows = df[df["QuestionId"].isin(config.QUESTION_IDS)]
    _, stats = encode_prompts(rows, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    detail = f"{config.PROMPT_VERSION}: mean {stats['mean_tokens']:.0f}, p95 {stats['p95_tokens']:.0f}, max {stats['max_tokens']} tokens (MAX_LEN {config.MAX_LEN})"
    if stats["shortened"] or stats["over_max_len"]:
        checks.warn("prompt lengths", f"{detail}; context shortened in {stats['shortened']} rows, "
                                      f"{stats['over_max_len']} rows over MAX_LEN even without context")
    else:
        checks.ok("prompt lengths", detail)


def check_init_from(checks):
    """--init-from: a trained global model with this run's folds, seed and label space."""
    if not config.INIT_FROM:
        return
    try:
        result = train.init_from_result(config.INIT_FROM)
    except InputError as error:
        checks.fail("init from", str(error))
        return
    checks.ok("init from", f"{config.INIT_FROM}: global model over {len(result['question_classes'])} questions, "
                           f"{result['folds']} fold(s), {result['label_space']} labels, prompt {config.PROMPT_VERSION}, "
                           f"MAP@3 {result['final_map3']:.4f}")


def check_output(checks, lora_params):
    try:
        os.makedirs(config.OUTPUT_DIR, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=config.OUTPUT_DIR):
            pass
        checks.ok("output dir", f"{os.path.abspath(config.OUTPUT_DIR)} writable")
    except OSError as error:
        checks.fail("output dir", f"{config.OUTPUT_DIR} not writable ({error.strerror})")
        return
    import torch
    free_gb = shutil.disk_usage(config.OUTPUT_DIR).free / 2**30
    # Two fp32 adapters (best, best_map3) per question and fold; while a model trains, its checkpoint: the adapter,
    # AdamW's two moments and a copy of best_map3, one per worker process.
    adapter_gb = 4 * (lora_params or 0) / 2**30
    workers = max(1, config.WORKERS, torch.cuda.device_count()) if config.CHECKPOINT_EVERY else 0
    needed_gb = (2 * len(config.QUESTION_IDS) * config.FOLDS + 4 * workers) * adapter_gb
    checks.check("disk", free_gb > needed_gb * 1.5,
                 f"{free_gb:.1f} GB free, adapters and checkpoints need about {needed_gb:.2f} GB")


def main(argv=None):
    config.parse_args(__doc__.splitlines()[0], "train", argv, recipe=config.DEFAULT_RECIPE)
    stages = train.run_stages()
    checks = Checklist()
    check_environment(checks)
    checks.ok("recipe", f"{config.RECIPE}: " + "; then ".join(train.stage_text(stage, stage) for stage in stages))
    trains_global = any(stage["SCOPE"] == "global" for stage in stages)
    for stage in stages:
        config.update(stage)
        train.resolve_prompt_version()  # as train.py: the global prompt for --scope global and --init-from
        check_config(checks)
        if not (trains_global and config.INIT_FROM == config.OUTPUT_DIR):  # else this run trains it first
            check_init_from(checks)
    config.update(stages[0])
    train.resolve_prompt_version()
    tokenizer, lora_params = check_model(checks)
    check_data(checks, tokenizer)
    check_output(checks, lora_params)
    print(f"{'all checks passed' if not checks.failures else f'{checks.failures} check(s) failed'}")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
