"""Padding, throughput and overhead of the project's real training and submit code paths (CPU-sized).

    python benchmarks/run.py --train-data /work/shared/data/map/train.csv

Measures, on a labelled CSV:
- prompt token lengths of every prompt version (prompts.encode_prompts at --max-len);
- padding efficiency (real tokens / tokens computed) of the training batches of every question over
  --epochs epochs, as train.py builds them (train.fold_splits and train.resolve_duplicates for the split,
  data_collator.LengthGroupedBatches and the collator, as MapTrainer.get_train_dataloader; no model is run),
  and of the inference batches utils.predict_logits builds for every question's rows;
- a short real training (train.main on --rows rows of each of --questions): tokens/s, from the training
  loop's and the evaluations' times in each question's log history;
- submit.main on --submit-rows rows of those questions (labels dropped): rows/s, wall time / time in the
  model's forward passes, base-model loads, padding of the batches the model received, and where the time
  outside the forward passes goes (StageClock: encoding, adapters, merging, batching, decoding, writing).
Only the project's public functions are called; the one patch is transformers' from_pretrained, to count the
base-model loads and time the forward passes (ForwardTimer wraps each loaded model's forward); StageClock
observes calls through a profile hook and replaces nothing.
The model is a random-init Qwen3 (--layers, --hidden) with the real Qwen3 tokenizer unless --model is given.
Prints tables and, as its last line, one JSON object with every figure.
"""
import contextlib
import functools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import config  # noqa: E402
import submit  # noqa: E402
import train  # noqa: E402
from data_collator import LengthGroupedBatches, build_data_collator  # noqa: E402
from demo.synthetic import build_tiny_qwen3  # noqa: E402
import utils  # noqa: E402
from prompts import PROMPTS, encode_prompts  # noqa: E402
from utils import (INPUT_COLUMNS, TARGET_COLUMN, InputError, load_tokenizer, predict_logits, read_competition_csv,  # noqa: E402
                   resolve_precision, setup_logging)

# The CPU this was written on is shared: two threads at most, fewer when OMP_NUM_THREADS asks (with
# other work on the cores, one thread avoids OpenMP threads waiting on each other at every op).
torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))

# Only the timed training and submit use --questions: two questions keep them to a few CPU minutes.
# Prompt lengths and padding are measured on every question of the file (no model compute needed).
DEFAULT_QUESTIONS = [31772, 31774]


def extra_arguments(parser):
    parser.add_argument("--rows", type=int, default=96, help="rows per question in the timed training run")
    parser.add_argument("--submit-rows", type=int, default=2048,
                        help="rows of the timed submit run (the hidden test has ~16,000: fewer rows overweight the fixed "
                             "tokenizer load)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random-init Qwen3 (without --model)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init Qwen3 (without --model)")
    parser.add_argument("--padding-only", action="store_true", help="measure prompt lengths and padding only")


# ---------------------------------------------------------------- instruments

class Counts:
    """Real tokens (attention mask), tokens computed (batch numel) and batches."""

    def __init__(self):
        self.real = self.computed = self.batches = 0

    def add(self, other):
        self.real += other.real
        self.computed += other.computed
        self.batches += other.batches
        return self

    def efficiency(self):
        return self.real / self.computed if self.computed else None


def total(counts):
    merged = Counts()
    for count in counts:
        merged.add(count)
    return merged


class CountingCollator:
    """The project's collator, counting what it builds: training batches (they carry labels) apart from
    inference batches (predict_logits passes input_ids only)."""

    def __init__(self, collator):
        self.collator = collator
        self.counts = {"train": Counts(), "infer": Counts()}

    def __call__(self, features):
        batch = self.collator(features)
        counts = self.counts["train" if "labels" in batch else "infer"]
        counts.real += int(batch["attention_mask"].sum())
        counts.computed += batch["attention_mask"].numel()
        counts.batches += 1
        return batch


class ForwardTimer:
    """Seconds inside a model's forward calls, LoRA layers included, and the tokens of their batches.

    The base model's own `forward` is wrapped: attaching and unloading adapters wraps the model in place, and
    peft before 0.14 calls `model.forward(...)` directly, which module hooks never see.
    """

    def __init__(self, stage_clock=None):
        self.seconds = 0.0
        self.calls = 0
        self.counts = Counts()
        self.models = []
        self.stage_clock = stage_clock

    def _sync(self, module):
        if next(module.parameters()).is_cuda:
            torch.cuda.synchronize()

    def attach(self, model):
        forward = model.forward

        @functools.wraps(forward)
        def timed_forward(*args, **kwargs):
            mask = kwargs["attention_mask"]
            self.counts.real += int(mask.sum())
            self.counts.computed += mask.numel()
            self.counts.batches += 1
            with self.stage_clock.paused() if self.stage_clock else contextlib.nullcontext():
                self._sync(model)
                start = time.perf_counter()
                output = forward(*args, **kwargs)
                self._sync(model)
                self.seconds += time.perf_counter() - start
            self.calls += 1
            return output

        model.forward = timed_forward
        self.models.append(model)
        return model

    def detach(self):
        for model in self.models:
            del model.forward  # the class's forward again


class StageClock:
    """Seconds spent in each of a few of the project's functions while submit.py runs, from a profile hook (it
    observes calls; nothing is replaced): each function's own time, the watched functions it calls left out.

    The hook is off during the forward passes (ForwardTimer pauses it), so it costs them nothing; outside them it
    adds a little to what it measures, which errs towards a higher wall / forward.
    """

    def __init__(self, stages):
        self.labels = {function.__code__: label for label, function in stages}
        self.seconds = dict.fromkeys(dict(stages), 0.0)
        self.local = threading.local()

    def _hook(self, frame, event, arg):
        label = self.labels.get(frame.f_code)
        if label is None or event not in ("call", "return"):
            return
        stack = self.local.__dict__.setdefault("stack", [])
        now = time.perf_counter()
        if event == "call":  # a generator's resume is a call, its yield a return: a context manager's two halves
            stack.append([label, now, 0.0])
            return
        label, start, inner = stack.pop()
        self.seconds[label] += now - start - inner
        if stack:
            stack[-1][2] += now - start

    @contextlib.contextmanager
    def watching(self):
        threading.setprofile(self._hook)
        sys.setprofile(self._hook)
        try:
            yield self
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    @contextlib.contextmanager
    def paused(self):
        """No hook inside (a forward pass); its time counts as the enclosing watched function's inner time."""
        hook = sys.getprofile()
        sys.setprofile(None)
        start = time.perf_counter()
        try:
            yield
        finally:
            stack = getattr(self.local, "stack", None)
            if stack:
                stack[-1][2] += time.perf_counter() - start
            sys.setprofile(hook)


# What submit.py does outside the forward passes, as the stages of StageClock. The tokenizer loads in a thread
# while the base model loads: its time overlaps the others and is reported beside them, not added.
SUBMIT_STAGES = [
    ("read test.csv", utils.read_competition_csv),
    ("load base model", utils.load_base_model),
    ("encode prompts", submit.encode_prompts),
    ("attach adapters", utils.load_adapter),
    ("detach adapters", peft.LoraModel.unload),
    ("merge LoRA, restore base weights", utils.lora_merged.__wrapped__),
    ("batches and collation", utils.predict_logits.__wrapped__),
    ("softmax over labels", utils.label_probabilities),
    ("answer correctness", utils.correctness_of),
    ("blend", utils.blend_probabilities),
    ("decode top-3", utils.decode_top_k),
    ("write and check submission", submit.write_submission),
]
TOKENIZER_STAGE = ("load tokenizer (alongside the base model)", utils.load_tokenizer)


class BatchingOnly(torch.nn.Module):
    """Stands in for the model so that predict_logits' own batching runs without any compute."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict_logits reads the device from it
        self.config = SimpleNamespace(num_labels=1)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(len(input_ids), 1))


# ---------------------------------------------------------------- measurements

def prompt_lengths(df, tokenizer):
    """encode_prompts' statistics for every prompt version; also the ids of config.PROMPT_VERSION."""
    stats, chosen = {}, None
    for version in PROMPTS:
        input_ids, stats[version] = encode_prompts(df, tokenizer, version, config.MAX_LEN)
        if version == config.PROMPT_VERSION:
            chosen = input_ids
    return stats, chosen


def training_split(rows):
    """The rows train.train_question trains a question on (--folds 1): its split, then its duplicates policy."""
    train_idx, _ = train.fold_splits(rows, 1, config.SEED)[0]
    _, trainable = train.resolve_duplicates(train.text_groups(rows), rows[TARGET_COLUMN].to_numpy(), config.DUPLICATES)
    return train_idx[trainable[train_idx]]


def training_padding(df, input_ids, tokenizer):
    """Padding of the training batches of every question over the epochs train.py runs: its split, its batch
    sampler (data_collator.LengthGroupedBatches, as MapTrainer.get_train_dataloader uses it) and its collator.

    A question with one class is skipped, as train.py skips it.
    """
    counted = {}
    for question_id in sorted(df["QuestionId"].unique()):
        rows = df[df["QuestionId"] == question_id].reset_index(drop=True)
        if rows[TARGET_COLUMN].nunique() <= 1:
            continue
        question_input_ids = [input_ids[i] for i in df.index[df["QuestionId"] == question_id]]
        features = [{"input_ids": question_input_ids[i], "labels": 0} for i in training_split(rows)]
        collator = CountingCollator(build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF))
        sampler = LengthGroupedBatches([len(row["input_ids"]) for row in features], config.TRAIN_BATCH_SIZE, config.SEED)
        for _ in range(config.EPOCHS):
            for batch in sampler:
                collator([features[i] for i in batch])
        counted[question_id] = collator.counts["train"]
    return counted


def inference_padding(df, input_ids, tokenizer):
    """Padding of the batches utils.predict_logits builds for every question's rows, as submit.py calls it
    (once per question)."""
    per_question = {}
    for question_id in sorted(df["QuestionId"].unique()):
        collator = CountingCollator(build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF))
        rows = df.index[df["QuestionId"] == question_id]
        predict_logits(BatchingOnly(), [input_ids[i] for i in rows], collator, config.EVAL_BATCH_SIZE, "fp32")
        per_question[question_id] = collator.counts["infer"]
    return per_question


def timed_training(df, rows_per_question, work_dir):
    """train.py's main on --rows rows of each of --questions: the time of its training loop and evaluations
    (from each question's log history), the tokens of its batches (the same split and sampler, counted apart)."""
    parts = []
    for question_id in config.QUESTION_IDS:
        rows = df[df["QuestionId"] == question_id]
        parts.append(rows.sample(n=min(rows_per_question, len(rows)), random_state=config.SEED))
    subset = pd.concat(parts).reset_index(drop=True)
    subset_path = os.path.join(work_dir, "train_subset.csv")
    subset.drop(columns=[TARGET_COLUMN]).to_csv(subset_path, index=False)

    argv = [config.SEED_RECIPE, "--model", config.MODEL_NAME, "--train-data", subset_path, "--output-dir", config.OUTPUT_DIR,
            "--questions", ",".join(map(str, config.QUESTION_IDS)), "--prompt-version", config.PROMPT_VERSION,
            "--max-len", str(config.MAX_LEN), "--epochs", str(config.EPOCHS), "--batch-size", str(config.TRAIN_BATCH_SIZE),
            "--eval-batch-size", str(config.EVAL_BATCH_SIZE), "--pad-to-multiple-of", str(config.PAD_TO_MULTIPLE_OF),
            "--seed", str(config.SEED)]
    start = time.perf_counter()
    code = train.main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"train.main exited with {code}")
    loop = evaluate = 0.0
    evaluations = 0
    for question_id in config.QUESTION_IDS:
        with open(os.path.join(config.get_question_log_dir(question_id), "log_history.json")) as handle:
            history = json.load(handle)
        trained = next(i for i, entry in enumerate(history) if "train_runtime" in entry)
        during = sum(entry["eval_runtime"] for entry in history[:trained] if "eval_runtime" in entry)
        loop += history[trained]["train_runtime"] - during  # the training loop, its evaluations left out
        evaluate += sum(entry["eval_runtime"] for entry in history if "eval_runtime" in entry)
        evaluations += sum("eval_runtime" in entry for entry in history)
    tokenizer = load_tokenizer(config.MODEL_NAME)
    input_ids, _ = encode_prompts(subset, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    counts = total(training_padding(subset, input_ids, tokenizer).values())
    return {
        "rows": len(subset), "wall_s": wall, "loop_s": loop, "counts": counts, "evaluate_s": evaluate,
        "evaluations": evaluations, "tokens_per_s": counts.real / loop, "computed_tokens_per_s": counts.computed / loop,
        "wall_tokens_per_s": counts.real / wall,
    }


def timed_submit(df, n_rows, work_dir):
    """submit.py's main on rows of --questions (labels dropped), with the adapters the timed training saved."""
    rows = df[df["QuestionId"].isin(config.QUESTION_IDS)]
    rows = rows.sample(n=min(n_rows, len(rows)), random_state=config.SEED)[INPUT_COLUMNS]
    test_path = os.path.join(work_dir, "test.csv")
    rows.to_csv(test_path, index=False)

    clock = StageClock(SUBMIT_STAGES + [TOKENIZER_STAGE])
    forward = ForwardTimer(clock)
    loads = []
    from_pretrained = transformers.AutoModelForSequenceClassification.from_pretrained

    def counted_from_pretrained(*args, **kwargs):
        # Every base model transformers loads is counted, and its forward passes timed.
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return forward.attach(from_pretrained(*args, **kwargs))

    argv = ["--model", config.MODEL_NAME, "--test-data", test_path, "--output-dir", config.OUTPUT_DIR,
            "--submission", os.path.join(work_dir, "submission.csv"), "--batch-size", str(config.EVAL_BATCH_SIZE),
            "--questions", ",".join(map(str, config.QUESTION_IDS)), "--pad-to-multiple-of", str(config.PAD_TO_MULTIPLE_OF)]
    try:
        with mock.patch.object(transformers.AutoModelForSequenceClassification, "from_pretrained", counted_from_pretrained):
            start = time.perf_counter()
            with clock.watching():
                code = submit.main(argv)
            wall = time.perf_counter() - start
    finally:
        forward.detach()
    if code != 0:
        raise RuntimeError(f"submit.main exited with {code}")
    # A `python submit.py` process also starts an interpreter and imports torch, transformers and peft
    # before main runs: timed apart, in a fresh process, and left out of the ratio (as the goal defines it).
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import submit"], cwd=ROOT, check=True)
    import_s = time.perf_counter() - start
    tokenizer_s = clock.seconds.pop(TOKENIZER_STAGE[0])
    seconds = {"forward passes": forward.seconds, **clock.seconds}
    seconds["other (not in a stage above)"] = wall - sum(seconds.values())
    return {
        "rows": len(rows), "wall_s": wall, "forward_s": forward.seconds, "forward_calls": forward.calls,
        "base_loads": len(loads), "counts": forward.counts, "seconds": seconds, "tokenizer_load_s": tokenizer_s,
        "rows_per_s": len(rows) / wall, "overhead_ratio": wall / forward.seconds if forward.seconds else None,
        "import_s": import_s,
    }


# ---------------------------------------------------------------- report

def table(rows, header):
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def measure(args, work_dir):
    """Every measurement; returns the figures and the tables that show them."""
    if not args.model_given:
        config.MODEL_NAME = build_tiny_qwen3(os.path.join(work_dir, "model"), seed=config.SEED, layers=args.layers, hidden=args.hidden)
        model_label = f"random-init Qwen3, {args.layers} layers, hidden {args.hidden}"
    else:
        model_label = config.MODEL_NAME
    config.OUTPUT_DIR = os.path.join(work_dir, "output")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(config.PRECISION, device)
    df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True).reset_index(drop=True)
    absent = [q for q in config.QUESTION_IDS if q not in set(df["QuestionId"])]
    if absent and not args.padding_only:  # only the timed runs use --questions
        raise InputError(f"{config.TRAIN_DATA_PATH}: no rows for QuestionId {', '.join(map(str, absent))}")
    tokenizer = load_tokenizer(config.MODEL_NAME)

    clock = time.perf_counter()
    prompt_stats, input_ids = prompt_lengths(df, tokenizer)
    prompt_s = time.perf_counter() - clock
    clock = time.perf_counter()
    train_padding = training_padding(df, input_ids, tokenizer)
    infer_padding = inference_padding(df, input_ids, tokenizer)
    padding_s = time.perf_counter() - clock
    train_total, infer_total = total(train_padding.values()), total(infer_padding.values())

    result = {
        "padding_efficiency_train": train_total.efficiency(), "padding_efficiency_infer": infer_total.efficiency(),
        "train_tokens_real": train_total.real, "train_tokens_computed": train_total.computed, "train_batches": train_total.batches,
        "infer_tokens_real": infer_total.real, "infer_tokens_computed": infer_total.computed, "infer_batches": infer_total.batches,
        "prompt_tokens": prompt_stats, "prompt_encode_s": prompt_s, "padding_measure_s": padding_s,
    }
    report = [
        f"model: {model_label}; data: {config.TRAIN_DATA_PATH} ({len(df)} rows); device: {device} ({precision}), "
        f"{torch.get_num_threads()} threads",
        f"settings: prompt {config.PROMPT_VERSION}, max_len {config.MAX_LEN}, train batch {config.TRAIN_BATCH_SIZE}, "
        f"eval batch {config.EVAL_BATCH_SIZE}, pad_to_multiple_of {config.PAD_TO_MULTIPLE_OF}, epochs {config.EPOCHS}\n",
        table([[version, s["rows"], fmt(s["mean_tokens"], 1), fmt(s["p95_tokens"], 0), s["max_tokens"], s["shortened"], s["over_max_len"]]
               for version, s in prompt_stats.items()],
              ["prompt tokens", "rows", "mean", "p95", "max", "shortened", f"over {config.MAX_LEN}"]),
        table([[question_id, *([train_padding[question_id].batches, fmt(train_padding[question_id].efficiency())]
                               if question_id in train_padding else ["-", "skipped"]),
                infer_padding[question_id].batches, fmt(infer_padding[question_id].efficiency())]
               for question_id in infer_padding]
              + [["all", train_total.batches, fmt(train_total.efficiency()), infer_total.batches, fmt(infer_total.efficiency())]],
              ["padding efficiency", "train batches", "train", "infer batches", "infer"]),
    ]
    if args.padding_only:
        return result, report

    timed = timed_training(df, args.rows, work_dir)
    submitted = timed_submit(df, args.submit_rows, work_dir)
    result.update({
        "train_tokens_per_s": timed["tokens_per_s"], "train_computed_tokens_per_s": timed["computed_tokens_per_s"],
        "train_wall_tokens_per_s": timed["wall_tokens_per_s"], "train_rows": timed["rows"], "train_wall_s": timed["wall_s"],
        "train_loop_s": timed["loop_s"], "train_evaluate_s": timed["evaluate_s"], "train_evaluations": timed["evaluations"],
        "train_run_tokens_real": timed["counts"].real, "padding_efficiency_train_run": timed["counts"].efficiency(),
        "submit_rows": submitted["rows"], "submit_wall_s": submitted["wall_s"], "submit_forward_s": submitted["forward_s"],
        "submit_rows_per_s": submitted["rows_per_s"], "submit_overhead_ratio": submitted["overhead_ratio"],
        "base_loads": submitted["base_loads"], "padding_efficiency_submit": submitted["counts"].efficiency(),
        "submit_seconds": submitted["seconds"], "submit_import_s": submitted["import_s"],
        "submit_tokenizer_load_s": submitted["tokenizer_load_s"],
    })
    questions = ",".join(map(str, config.QUESTION_IDS))
    report += [
        table([["rows (train + validation)", timed["rows"]], ["wall s", fmt(timed["wall_s"], 1)],
               ["training loop s (evaluations left out)", fmt(timed["loop_s"], 1)],
               [f"evaluation s ({timed['evaluations']} evaluations)", fmt(timed["evaluate_s"], 1)],
               ["real tokens / loop s", fmt(timed["tokens_per_s"], 0)],
               ["computed tokens / loop s", fmt(timed["computed_tokens_per_s"], 0)],
               ["real tokens / wall s", fmt(timed["wall_tokens_per_s"], 0)],
               ["padding efficiency of its batches", fmt(timed["counts"].efficiency())]],
              [f"train.py, questions {questions}", "value"]),
        table([[name, fmt(seconds, 2), fmt(100 * seconds / submitted["wall_s"], 1)]
               for name, seconds in sorted(submitted["seconds"].items(), key=lambda item: -item[1])]
              + [["wall", fmt(submitted["wall_s"], 2), "100.0"]],
              [f"submit.py, {submitted['rows']} rows", "s", "%"]),
        f"tokenizer load {fmt(submitted['tokenizer_load_s'], 2)} s, in a thread while the base model loads (not in the sum)\n"
        f"submit: {fmt(submitted['rows_per_s'], 1)} rows/s; wall / forward {fmt(submitted['overhead_ratio'])}; "
        f"base-model loads {submitted['base_loads']}; padding efficiency {fmt(submitted['counts'].efficiency())}\n"
        f"(a `python submit.py` process adds {fmt(submitted['import_s'], 1)} s of interpreter start and imports before main, "
        f"not in the ratio)",
    ]
    return result, report


def main(argv=None):
    default_model = config.MODEL_NAME
    args = config.parse_args(__doc__.splitlines()[0], "run", argv, extra_arguments=extra_arguments)
    if "QUESTION_IDS" not in config.GIVEN:
        config.update({"QUESTION_IDS": DEFAULT_QUESTIONS})
    args.model_given = config.MODEL_NAME != default_model
    setup_logging()
    # The tables are the output: train.py's and submit.py's progress would only bury them.
    logging.getLogger().setLevel(logging.CRITICAL)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="map_bench_") as work_dir:
            result, report = measure(args, work_dir)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    finally:
        logging.getLogger().setLevel(logging.INFO)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["seconds"] = time.perf_counter() - started
    # On a shared machine the timings mean little without the load they were taken under.
    result["load_average"] = os.getloadavg()[0]
    print("\n".join(report))
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; benchmark took {result['seconds']:.0f} s; "
          f"load average {result['load_average']:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 2)
