"""Training and inference speed of the Qwen3-0.6B architecture on one GPU, through the project's own code.

    python benchmarks/gpu.py --seconds 180                       # one H100: bf16, then fp16 (the T4 path)
    python benchmarks/gpu.py --train-data train.csv --seconds 180  # token lengths of real rows
    python benchmarks/gpu.py --tiny                               # tiny config on CPU, for the tests
    python benchmarks/gpu.py --scaling                            # one model's epoch on 1, 2, ... all GPUs (torchrun)

The model is built from the Qwen3-0.6B config with random weights (nothing is downloaded); the tokenizer is
the real Qwen3 one (demo.synthetic.qwen_tokenizer_dir). Rows are --train-data's, or synthetic ones inside
the prompt version's context whose explanations are 60 tokens on average, p99 114, max 310 (the issue's
figures; the real train.csv's explanations are shorter, mean 22, p99 64, max 286 tokens: --train-data gives
its own lengths).

Training runs train.train_question on all rows as one pooled question: its split, prompts, LoRA and
MapTrainer with the project's length-grouped batches and collator, unchanged. A forward pre-hook on the
model (which this script builds) counts the tokens and stops the run at the time budget; evaluations are
pushed past the end (EVAL_STEPS). Inference attaches a fresh LoRA adapter per question and calls
utils.predict_logits, as submit.py does (without reading adapters from disk). Only public functions of the
project are called; none is patched.

Then the submit path (issue 23), recorded for a lent GPU: the default recipe trained for one epoch on synthetic
rows of three questions on the same random-init model, benchmarks/parity.py's comparison of train.py's evaluation
against submit.py's Predictor, LoRA unmerged and merged, at fp32 and each precision timed, and the global model's
pass over 16,000 rows on one GPU and on all of them (submit.global_probabilities).

FLOPs: 6 * N * real tokens + 12 * layers * attention width * sum(row length^2) (PaLM's count, attention
included), N = all parameters but the embedding table, LoRA included. With LoRA the frozen weights get no
weight gradients, so the work actually done is nearer 4 * N_frozen + 6 * N_lora per token: `mfu_executed`.
Prints a table and, as its last line, one JSON object.

--scaling instead times one epoch of the global model (train.py --scope global --epochs 1, evaluated at its start
and end) over --rows synthetic rows of the 15 questions under torchrun at 1, 2, ... all GPUs, on the same
random-init model saved to a scratch folder; on CPU, 1 process of all OMP_NUM_THREADS threads against 2 of half
as many each. The seconds are train.py's own (results' `seconds`), start-up of the processes left out.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # parity.py, a script beside this one

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType  # noqa: E402
from transformers import Qwen3Config, Qwen3ForSequenceClassification  # noqa: E402

import config  # noqa: E402
import parity  # noqa: E402
import submit  # noqa: E402
import train  # noqa: E402
from data_collator import build_data_collator  # noqa: E402
from demo.synthetic import FILLER, make_rows, make_synthetic_test, make_synthetic_train, qwen_tokenizer_dir  # noqa: E402
from prompt_utils import questions  # noqa: E402
from prompts import encode_prompts  # noqa: E402
from utils import (TARGET_COLUMN, TORCH_DTYPES, Backbone, InputError, attach_lora, load_base_model, load_tokenizer,  # noqa: E402
                   predict_logits, read_competition_csv, resolve_precision)

# The CPU this was written on is shared: two threads at most, fewer when OMP_NUM_THREADS asks (with
# other work on the cores, one thread avoids OpenMP threads waiting on each other at every op).
torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))

# Qwen3-0.6B's config.json, less the generation settings a classifier does not use.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=None)  # as Qwen3-0.6B's config.json
TINY = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
# Explanation length in tokens: lognormal with mean 60 and p99 114 (sigma from p99/mean), longest row 310.
EXPLANATION_MU, EXPLANATION_SIGMA, EXPLANATION_MAX = 4.05, 0.295, 310
FULL_ROWS = 36696  # rows of the competition's train.csv


def extra_arguments(parser):
    parser.add_argument("--tiny", action="store_true", help="tiny model, few rows and steps: a CPU check of this script")
    parser.add_argument("--seconds", type=float, default=None, help="time budget of the measurements (default 180; 20 with --tiny)")
    parser.add_argument("--precisions", default="bf16,fp16", help="precisions to time, in turn")
    parser.add_argument("--rows", type=int, default=None, help="rows in the pool (default 16000; 256 with --tiny)")
    parser.add_argument("--infer-rows", type=int, default=None, help="most rows to predict (default 16000; 32 with --tiny)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps (default none; 4 with --tiny)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the training throughput")
    parser.add_argument("--scaling", action="store_true", help="time one model's epoch on 1 to all GPUs (torchrun) instead")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the GPU at the precision timed (H100 SXM bf16/fp16: 989)")


# ---------------------------------------------------------------- data and model

def synthetic_rows(n_rows, rng):
    """Competition-format rows whose explanations are single-token words, of the real length distribution."""
    question_ids = list(questions)
    picked = rng.choice(len(question_ids), size=n_rows)
    rows = []
    for index, count in zip(*np.unique(picked, return_counts=True)):
        rows += make_rows(question_ids[index], int(count), rng)
    df = pd.DataFrame(rows)
    lengths = np.clip(np.round(rng.lognormal(EXPLANATION_MU, EXPLANATION_SIGMA, n_rows)), 1, EXPLANATION_MAX).astype(int)
    lengths[0] = EXPLANATION_MAX
    df["StudentExplanation"] = [" ".join(rng.choice(FILLER, size=length)) for length in lengths]
    df.insert(0, "row_id", [str(i) for i in range(len(df))])
    df[TARGET_COLUMN] = df["Category"] + ":" + df["Misconception"]
    return df


def load_rows(n_rows, seed, synthetic):
    rng = np.random.default_rng(seed)
    if synthetic:
        return synthetic_rows(n_rows, rng), "synthetic"
    df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
    if len(df) > n_rows:
        df = df.iloc[np.sort(rng.choice(len(df), size=n_rows, replace=False))]
    return df.reset_index(drop=True), config.TRAIN_DATA_PATH


def build_model(tiny, tokenizer, device):
    """Random-init Qwen3 classifier, made directly on the device (fast even at full size)."""
    model_config = Qwen3Config(**(TINY if tiny else QWEN3_06B), pad_token_id=tokenizer.pad_token_id, num_labels=2)
    torch.manual_seed(config.SEED)
    with torch.device(device):
        model = Qwen3ForSequenceClassification(model_config)
    model.config.pad_token_id = tokenizer.pad_token_id  # as utils.load_base_model
    return model


def lora_config():
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=config.LORA_RANK, lora_alpha=config.LORA_ALPHA,
                      lora_dropout=config.LORA_DROPOUT, target_modules=config.LORA_TARGET_MODULES)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb(device):
    return torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None


# ---------------------------------------------------------------- training

class TrainingTimed(Exception):
    """Leaves train.train_question once the timed steps are done (its evaluation and saves are not timed)."""


class Meter:
    """A pre-hook on the model's decoder, run before each forward pass: real/computed tokens and sum of squared
    lengths per micro-batch, the clock at the start, after the warm-up steps and at the end, and the stop
    (TrainingTimed, raised through the Trainer) at the time budget, at --max-steps, or at the first evaluation
    forward pass after training began (train_question also evaluates once before its first step: not timed)."""

    def __init__(self, model, device, budget_s, warmup_steps, max_steps):
        self.model, self.device, self.budget_s, self.warmup_steps, self.max_steps = model, device, budget_s, warmup_steps, max_steps
        self.real = self.computed = self.rows = self.square_sum = 0
        self.pending = []  # row lengths still on the GPU: reading them at every step would wait for it
        self.marks = {}  # name -> (time, step, real, computed, rows, square_sum)
        self.micro_batches = 0

    def mark(self, name, step):
        sync(self.device)  # the GPU may run behind the Python loop
        now = time.perf_counter()
        for lengths in self.pending:
            self.real += int(lengths.sum())
            self.square_sum += int((lengths.double() ** 2).sum())
        self.pending = []
        self.marks[name] = (now, step, self.real, self.computed, self.rows, self.square_sum)

    def before_forward(self, module, args, kwargs):
        # Every optimizer step before this micro-batch is complete (backward and optimizer step included).
        step = self.micro_batches // config.GRADIENT_ACCUMULATION_STEPS
        if not module.training:
            if "begin" not in self.marks:
                return
            self.mark("end", step)
            raise TrainingTimed
        if self.micro_batches % config.GRADIENT_ACCUMULATION_STEPS == 0:
            if step == 0:
                self.mark("begin", 0)
                # LoRA and the head are attached to the base model now: count what trains and what does not.
                self.frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
                self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            if step == self.warmup_steps:
                self.mark("warm", step)
            if step > 0 and (time.perf_counter() - self.marks["begin"][0] >= self.budget_s
                             or (self.max_steps and step >= self.max_steps)):
                self.mark("end", step)
                raise TrainingTimed
        mask = kwargs["attention_mask"]
        self.pending.append(mask.sum(dim=1))
        self.computed += mask.numel()
        self.rows += len(mask)
        self.micro_batches += 1

    def window(self):
        """Differences between the end and the warm mark (the begin mark when training was too short)."""
        start = self.marks.get("warm") or self.marks["begin"]
        return [end - begin for end, begin in zip(self.marks["end"], start)]


def time_training(df, tokenizer, base_model, precision, budget_s, warmup_steps, max_steps, device):
    meter = Meter(base_model, device, budget_s, warmup_steps, max_steps)
    # The decoder runs once per micro-batch whatever wraps the model (LoRA, the head); the pre-hook sees its mask.
    handle = base_model.model.register_forward_pre_hook(meter.before_forward, with_kwargs=True)
    reset_peak(device)
    try:
        # All rows as one question: one long run of the real training code, not 15 short ones.
        pooled = df.assign(QuestionId=df["QuestionId"].iloc[0])  # one split over all rows, as one question's
        train.train_question(int(df["QuestionId"].iloc[0]), pooled, Backbone(tokenizer, base_model, precision, device))
        raise RuntimeError("train.train_question returned without evaluating")
    except TrainingTimed:
        pass
    finally:
        handle.remove()
    seconds, steps, real, computed, rows, square_sum = meter.window()
    embedding = base_model.get_input_embeddings().weight.numel()
    n_frozen, n_lora = meter.frozen - embedding, meter.trainable
    model_config = base_model.config
    attention = 12 * model_config.num_hidden_layers * model_config.num_attention_heads * model_config.head_dim * square_sum
    flops = 6 * (n_frozen + n_lora) * real + attention
    executed = (4 * n_frozen + 6 * n_lora) * real + attention
    return {
        "steps": steps, "seconds": seconds, "rows": rows, "tokens_real": real, "tokens_computed": computed,
        "tokens_per_s": real / seconds, "computed_tokens_per_s": computed / seconds, "rows_per_s": rows / seconds,
        "step_s": seconds / steps if steps else None, "padding_efficiency": real / computed if computed else None,
        "mean_tokens_per_row": real / rows if rows else None, "tflops": flops / seconds / 1e12,
        "tflops_executed": executed / seconds / 1e12, "parameters_non_embedding": n_frozen, "parameters_lora": n_lora,
        "peak_gpu_memory_mb": peak_gpu_mb(device),
    }


# ---------------------------------------------------------------- inference

def predict_rows(base_model, tokenizer, input_ids, question_of_row, precision):
    """As submit.py: per question, a fresh adapter and head attached to the base model, predict_logits, unload."""
    collator = build_data_collator(tokenizer, config.PAD_TO_MULTIPLE_OF)
    real = 0
    for question_id in np.unique(question_of_row):
        rows = np.flatnonzero(question_of_row == question_id)
        model = attach_lora(base_model, lora_config(), 6, trainable=False)
        try:
            predict_logits(model, [input_ids[i] for i in rows], collator, config.EVAL_BATCH_SIZE, precision)
        finally:
            model.unload()
        real += sum(len(input_ids[i]) for i in rows)
    return real


def time_inference(base_model, tokenizer, input_ids, question_of_row, precision, budget_s, max_rows, device, rng):
    """Rows/s of the submit path: a warm-up, a probe that sizes the timed run to the budget, the timed run."""
    def timed(n_rows):
        picked = np.sort(rng.choice(len(input_ids), size=min(n_rows, len(input_ids)), replace=False))
        sync(device)
        start = time.perf_counter()
        tokens = predict_rows(base_model, tokenizer, [input_ids[i] for i in picked], question_of_row[picked], precision)
        sync(device)
        return len(picked), time.perf_counter() - start, tokens

    reset_peak(device)
    timed(config.EVAL_BATCH_SIZE)  # kernels and allocator warm up
    probe = timed(min(max_rows, 8 * config.EVAL_BATCH_SIZE))
    n_rows = min(max_rows, len(input_ids), int(probe[0] / probe[1] * budget_s * 0.8))
    rows, seconds, tokens = timed(n_rows) if n_rows > probe[0] else probe
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
            "peak_gpu_memory_mb": peak_gpu_mb(device)}


# ---------------------------------------------------------------- the submit path

SUBMIT_CHECK_QUESTIONS = [31772, 33471, 109465]


def submit_path_checks(tiny, tokenizer, precisions, device):
    """What submit.py runs on this device against what train.py validated: the default recipe (a global model, then
    per-question models) trained for one epoch on synthetic rows of three questions, on the model timed above
    (random weights); then benchmarks/parity.py's comparison (train.py's evaluation path, submit.py's Predictor
    unmerged and merged) at each precision, and the global model's pass over the rows of a hidden-test-sized
    file on one device and on all (two CPU "devices" with --tiny)."""
    work = tempfile.mkdtemp(prefix="map_gpu_submit_")
    try:
        model_dir = os.path.join(work, "model")
        build_model(tiny, tokenizer, "cpu").save_pretrained(model_dir)
        for name in os.listdir(qwen_tokenizer_dir()):
            shutil.copy(os.path.join(qwen_tokenizer_dir(), name), model_dir)
        train_df = make_synthetic_train(40 if tiny else 300, seed=config.SEED, question_ids=SUBMIT_CHECK_QUESTIONS)
        train_path = os.path.join(work, "train.csv")
        train_df.to_csv(train_path, index=False)
        usable = [p for p in precisions if not (device == "cpu" and p == "fp16")]  # the Trainer's fp16 is GPU-only
        questions_flag = ",".join(map(str, SUBMIT_CHECK_QUESTIONS))
        if train.main([config.DEFAULT_RECIPE, "--model", model_dir, "--train-data", train_path, "--questions", questions_flag,
                       "--output-dir", os.path.join(work, "run"), "--epochs", "1", "--precision", usable[0],
                       "--checkpoint-every", "0"]) != 0:
            return {"skipped": "training the checks' run failed"}
        parity_argv = ["--model", model_dir, "--train-data", train_path, "--output-dir", os.path.join(work, "run"),
                       "--questions", questions_flag, "--precisions", ",".join(precisions)]
        checks = {"parity": parity.main(parity_argv)["precisions"]}
        test_df = make_synthetic_test(train_df, rows=64 if tiny else 16000)
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu", "cpu"]
        config.update({"PRECISION": usable[0]})
        predictors = [submit.Predictor(load_base_model(model_dir, load_tokenizer(model_dir), TORCH_DTYPES[usable[0]], "cpu"),
                                       load_tokenizer(model_dir), device) for device in devices]
        checks["global_pass"] = {}
        for count in sorted({1, len(devices)}):
            sync(devices[0])
            start = time.perf_counter()
            parts = submit.global_probabilities(predictors[:count], test_df)
            for device in devices[:count]:
                sync(device)
            checks["global_pass"][count] = {"seconds": time.perf_counter() - start,
                                            "rows": sum(len(part[1]) for part in parts.values())}
        checks.update({"devices": devices, "global_pass_precision": usable[0]})
        return checks
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- main

def scaling(tiny, n_rows):
    """{processes: seconds} of one epoch of the global model trained by train.py under torchrun."""
    scratch = tempfile.mkdtemp(prefix="map_gpu_scaling_")
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    model_dir, data = os.path.join(scratch, "model"), os.path.join(scratch, "train.csv")
    build_model(tiny, tokenizer, "cpu").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    make_synthetic_train(max(10, n_rows // len(questions)), seed=config.SEED).to_csv(data, index=False)
    gpus = torch.cuda.device_count()
    counts = list(range(1, gpus + 1)) if gpus else [1, 2]
    threads = torch.get_num_threads()
    runs = {}
    for count in counts:
        output_dir = os.path.join(scratch, f"run_{count}")
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // count)), "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                   "train.py", config.DEFAULT_RECIPE, "--model", model_dir, "--train-data", data, "--output-dir",
                   output_dir, "--scope", "global", "--epochs", "1", "--eval-steps", str(10**9),
                   "--batch-size", str(config.TRAIN_BATCH_SIZE)]
        run = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"torchrun with {count} process(es) failed:\n{run.stderr[-3000:]}")
        with open(os.path.join(output_dir, "summary", "global_results.json")) as handle:
            result = json.load(handle)
        runs[count] = {"seconds": result["seconds"], "steps": result["steps"], "train_rows": result["train_rows"],
                       "threads_per_process": int(env["OMP_NUM_THREADS"]), "final_map3": result["final_map3"]}
    shutil.rmtree(scratch, ignore_errors=True)
    one = runs[counts[0]]["seconds"]
    print(f"one epoch of the global model ({'tiny Qwen3' if tiny else 'Qwen3-0.6B architecture'}, "
          f"{runs[counts[0]]['train_rows']} training rows, --batch-size {config.TRAIN_BATCH_SIZE} per process) on "
          f"{torch.cuda.get_device_name() if gpus else 'cpu'}")
    print(f"{'processes':>10}{'threads each':>14}{'steps':>7}{'seconds':>9}{'speed-up':>10}{'efficiency':>12}")
    for count, run in runs.items():
        print(f"{count:>10}{run['threads_per_process']:>14}{run['steps']:>7}{run['seconds']:>9.1f}"
              f"{one / run['seconds']:>10.2f}{one / run['seconds'] / count:>12.2f}")
    summary = {"scaling": runs, "device": torch.cuda.get_device_name() if gpus else "cpu", "tiny": tiny}
    print(json.dumps(summary, sort_keys=True))
    return summary


def fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def main(argv=None):
    default_data = config.TRAIN_DATA_PATH
    args = config.parse_args(__doc__.splitlines()[0], "gpu", argv, extra_arguments=extra_arguments)
    if args.scaling:
        return scaling(args.tiny, args.rows or (2250 if args.tiny else 16000))
    seconds = args.seconds if args.seconds is not None else (20 if args.tiny else 180)
    n_rows = args.rows or (256 if args.tiny else 16000)
    infer_rows = args.infer_rows or (32 if args.tiny else 16000)
    max_steps = args.max_steps if args.max_steps is not None else (4 if args.tiny else 0)
    warmup_steps = min(args.warmup_steps, 1) if args.tiny else args.warmup_steps
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()

    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    df, source = load_rows(n_rows, config.SEED, synthetic=config.TRAIN_DATA_PATH == default_data)
    input_ids, prompt_stats = encode_prompts(df, tokenizer, config.PROMPT_VERSION, config.MAX_LEN)
    question_of_row = df["QuestionId"].to_numpy()
    base_model = build_model(args.tiny, tokenizer, device)
    setup_s = time.perf_counter() - started
    # train.py evaluates every EVAL_STEPS of a run (a fraction) over VAL_FRACTION of the rows: projected below.
    evaluations = round(1 / config.EVAL_STEPS) if config.EVAL_STEPS < 1 else 0
    # Evaluations would only add untimed forward passes; adapters and encoders go to a scratch folder.
    config.update({"EVAL_STEPS": 10**9, "OUTPUT_DIR": tempfile.mkdtemp(prefix="map_gpu_bench_")})

    share = seconds / max(1, len(precisions))
    results = {}
    for precision in precisions:
        try:
            resolve_precision(precision, device)
        except InputError as error:
            results[precision] = {"skipped": str(error)}
            continue
        if precision == "fp16" and device == "cpu":
            # The Trainer autocasts fp16 on GPUs only: on CPU the fp16 base model meets the fp32 head and fails.
            results[precision] = {"skipped": "fp16 mixed precision is a GPU path (no fp16 autocast on CPU)"}
            continue
        base_model.to(TORCH_DTYPES[precision])
        training = time_training(df, tokenizer, base_model, precision, 0.7 * share, warmup_steps, max_steps, device)
        inference = time_inference(base_model, tokenizer, input_ids, question_of_row, precision, 0.3 * share, infer_rows,
                                   device, np.random.default_rng(config.SEED))
        training["mfu"] = training["tflops"] / args.peak_tflops
        training["mfu_executed"] = training["tflops_executed"] / args.peak_tflops
        # The measure: 36,696 rows x EPOCHS at the measured rate, evaluations not included ...
        training["projected_full_train_s"] = FULL_ROWS * config.EPOCHS / training["rows_per_s"]
        # ... and with the evaluations train.py adds (all questions: FULL_ROWS * VAL_FRACTION rows each time).
        training["projected_full_with_evaluations_s"] = (training["projected_full_train_s"]
                                                          + evaluations * FULL_ROWS * config.VAL_FRACTION / inference["rows_per_s"])
        inference["projected_16000_rows_s"] = 16000 / inference["rows_per_s"]
        results[precision] = {"train": training, "infer": inference}
    shutil.rmtree(config.OUTPUT_DIR, ignore_errors=True)

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model: {'tiny Qwen3' if args.tiny else 'Qwen3-0.6B architecture'}, random weights, "
          f"attention {base_model.config._attn_implementation}; LoRA r{config.LORA_RANK} alpha {config.LORA_ALPHA} on "
          f"{','.join(config.LORA_TARGET_MODULES)}")
    print(f"rows: {source}, {len(df)} rows, prompt {config.PROMPT_VERSION} tokens mean {prompt_stats['mean_tokens']:.1f} "
          f"p95 {prompt_stats['p95_tokens']:.0f} max {prompt_stats['max_tokens']}; train batch {config.TRAIN_BATCH_SIZE}, "
          f"eval batch {config.EVAL_BATCH_SIZE}, pad_to_multiple_of {config.PAD_TO_MULTIPLE_OF}, "
          f"gradient checkpointing {config.GRADIENT_CHECKPOINTING}; peak {args.peak_tflops:.0f} TFLOP/s\n")
    lines = [("train steps timed", "steps", 0), ("train tokens/s (real)", "tokens_per_s", 0),
             ("train tokens/s (computed)", "computed_tokens_per_s", 0), ("train rows/s", "rows_per_s", 1),
             ("train step s", "step_s", 3), ("train padding efficiency", "padding_efficiency", 3),
             ("model TFLOP/s (6N)", "tflops", 1), ("MFU (6N)", "mfu", 3), ("MFU executed (4N frozen)", "mfu_executed", 3),
             ("36,696 rows x epochs, s", "projected_full_train_s", 0),
             ("... with evaluations, s", "projected_full_with_evaluations_s", 0), ("train peak GPU MB", "peak_gpu_memory_mb", 0)]
    timed = [p for p in precisions if "train" in results[p]]
    print(f"{'':32}" + "".join(f"{p:>14}" for p in precisions))
    for label, key, digits in lines:
        print(f"{label:32}" + "".join(f"{fmt(results[p]['train'][key], digits) if p in timed else 'skipped':>14}" for p in precisions))
    for label, key, digits in [("infer rows timed", "rows", 0), ("infer rows/s", "rows_per_s", 1),
                               ("infer tokens/s", "tokens_per_s", 0), ("16,000 rows, s", "projected_16000_rows_s", 1),
                               ("infer peak GPU MB", "peak_gpu_memory_mb", 0)]:
        print(f"{label:32}" + "".join(f"{fmt(results[p]['infer'][key], digits) if p in timed else 'skipped':>14}" for p in precisions))

    checks = submit_path_checks(args.tiny, tokenizer, list(dict.fromkeys(["fp32", *precisions])), device)
    if "global_pass" in checks:
        one, *more = checks["global_pass"].values()
        print(f"global model's pass over {one['rows']:,} rows ({checks['global_pass_precision']}): {one['seconds']:.1f} s on "
              f"{checks['devices'][0]}" + (f", {more[0]['seconds']:.1f} s on {len(checks['devices'])} devices" if more else ""))
    summary = {"device": device_name, "tiny": args.tiny, "rows_source": source, "rows": len(df), "submit_path": checks,
               "prompt_tokens": prompt_stats, "setup_s": setup_s, "seconds": time.perf_counter() - started,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "precisions": results,
               "load_average": os.getloadavg()[0]}
    first = next((p for p in precisions if p in timed), None)
    if first:
        # Headline figures: the first precision timed (bf16 by default).
        summary.update({"train_tokens_per_s": results[first]["train"]["tokens_per_s"], "mfu": results[first]["train"]["mfu"],
                        "projected_full_train_s": results[first]["train"]["projected_full_train_s"],
                        "infer_rows_per_s": results[first]["infer"]["rows_per_s"],
                        "projected_16000_rows_s": results[first]["infer"]["projected_16000_rows_s"],
                        "peak_gpu_memory_mb": results[first]["train"]["peak_gpu_memory_mb"]})
    print(f"\ntook {summary['seconds']:.0f} s (setup {setup_s:.0f} s)")
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
