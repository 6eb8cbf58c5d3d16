"""Shared by train.py and submit.py: data I/O and validation, labels, the metric, and model loading."""
import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import joblib
import numpy as np
import pandas as pd
import peft
import torch
import transformers
from sklearn.preprocessing import LabelEncoder
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import config
from data_collator import padding_batch_sizes, sorted_batches
from prompt_utils import CATEGORIES, answer_is_correct

log = logging.getLogger("map")

TOP_K = 3
INPUT_COLUMNS = ["row_id", "QuestionId", "QuestionText", "MC_Answer", "StudentExplanation"]
LABEL_COLUMNS = ["Category", "Misconception"]
TARGET_COLUMN = "Category:Misconception"
HEAD_NAMES = ("score", "classifier")

# peft's get_peft_model reads transformers 5's deprecated `is_gradient_checkpointing` at every attach_lora; harmless,
# and nothing we can change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")


class InputError(Exception):
    """A problem with the user's files or settings: reported as one line, without a traceback."""


def setup_logging(log_file=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight loading/saving bars: ours show the run's progress
    if log_file:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        return handler
    return None


# ---------------------------------------------------------------- data

def read_competition_csv(path, labelled):
    """Read a competition CSV, keeping the literal string NA; raise InputError naming what is wrong."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty")
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV ({str(error).splitlines()[0]})") from None
    required = INPUT_COLUMNS + (LABEL_COLUMNS if labelled else [])
    missing = [column for column in required if column not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    if labelled and df.empty:
        raise InputError(f"{path}: no data rows")
    bad_ids = df.loc[~df["QuestionId"].str.strip().str.fullmatch(r"\d+"), ["row_id", "QuestionId"]]
    if len(bad_ids):
        first = bad_ids.iloc[0]
        raise InputError(f"{path}: column QuestionId has non-integer value {first.QuestionId!r} (row_id {first.row_id})")
    df["QuestionId"] = df["QuestionId"].astype(int)
    duplicated = df.loc[df["row_id"].duplicated(), "row_id"]
    if len(duplicated):
        raise InputError(f"{path}: column row_id has duplicate value(s) {', '.join(duplicated.unique()[:5])}")
    if labelled:
        bad = df.loc[~df["Category"].isin(CATEGORIES)]
        if len(bad):
            raise InputError(f"{path}: column Category has unknown value {bad.iloc[0].Category!r} (row_id {bad.iloc[0].row_id})")
        empty = df.loc[df["Misconception"].str.strip() == ""]
        if len(empty):
            raise InputError(f"{path}: column Misconception is empty (row_id {empty.iloc[0].row_id}); use NA for none")
        df[TARGET_COLUMN] = df["Category"] + ":" + df["Misconception"]
    return df


def correctness_of(df):
    """Per row: True/False whether MC_Answer is the question's correct answer, None for unknown questions."""
    return [answer_is_correct(qid, answer) for qid, answer in zip(df["QuestionId"], df["MC_Answer"])]


def write_json_atomic(path, data):
    """Write JSON so that readers never see a half-written file (a crash leaves the old one)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(handle.name, path)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def read_question_results(question_ids):
    """The summary/question_<id>_results.json of each question that has one, by QuestionId."""
    results = {}
    for question_id in question_ids:
        path = config.get_question_results_path(question_id)
        if os.path.isfile(path):
            results[question_id] = read_json(path)
    return results


# ---------------------------------------------------------------- labels and metric

def fit_label_encoder(labels, path):
    encoder = LabelEncoder().fit(labels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    joblib.dump(encoder, path)
    return encoder


def average_precisions(true_labels, predicted, k=TOP_K):
    """Per row, the competition's score for one true label: 1/rank of its first appearance in the top k, else 0."""
    scores = np.zeros(len(true_labels))
    for row, (truth, ranked) in enumerate(zip(true_labels, predicted)):
        ranked = list(ranked)[:k]
        if truth in ranked:
            scores[row] = 1.0 / (ranked.index(truth) + 1)
    return scores


def map_at_k(true_labels, predicted, k=TOP_K):
    """Competition MAP@k: the mean of average_precisions."""
    return float(average_precisions(true_labels, predicted, k).mean()) if len(true_labels) else 0.0


def paired_difference(differences, samples=2000, seed=0):
    """Mean of per-row differences between two predictions of the same rows, and its bootstrap 95% interval."""
    differences = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    boot = differences[rng.integers(0, len(differences), (samples, len(differences)))].mean(axis=1)
    return float(differences.mean()), tuple(float(x) for x in np.percentile(boot, [2.5, 97.5]))


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


PREFIXES = ("True_", "False_")


def label_suffix(label):
    """`True_Misconception:X` -> `Misconception:X`: the label without what the answer's correctness says."""
    return label.split("_", 1)[1] if label.startswith(PREFIXES) else label


def training_targets(df, label_space):
    """The label each row is trained on: `Category:Misconception` (full) or its suffix (suffix)."""
    return df[TARGET_COLUMN] if label_space == "full" else df[TARGET_COLUMN].map(label_suffix)


def allowed_classes(question_ids, classes, question_classes):
    """Rows x classes: True where the class was seen for the row's question in training (all for unknown questions)."""
    classes = np.asarray(classes)
    allowed = np.ones((len(question_ids), len(classes)), dtype=bool)
    for row, question_id in enumerate(question_ids):
        seen = question_classes.get(str(question_id))
        if seen:
            allowed[row] = np.isin(classes, seen)
    return allowed


def label_probabilities(logits, classes, correct, allowed=None):
    """(full labels, probabilities per row) from a model's logits over its classes.

    `allowed` (rows x classes) restricts each row to its question's labels. A suffix class is given the True_
    or False_ prefix that the row's answer correctness says; where correctness is unknown, both, at half each.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    probs = softmax(logits)
    if all(label.startswith(PREFIXES) for label in classes):
        return list(classes), probs
    verdicts = np.array([0.5 if verdict is None else float(verdict) for verdict in correct])
    columns = []
    for column, label in enumerate(classes):
        if label.startswith(PREFIXES):
            columns.append(probs[:, column])
        else:
            columns += [probs[:, column] * verdicts, probs[:, column] * (1 - verdicts)]
    return full_labels(classes), np.stack(columns, axis=1)


def question_label_mask(question_ids, labels, question_classes):
    """Rows x full `labels`: True where the label decodes from a class a row's question has (all for unknown questions)."""
    labels = np.asarray(labels)
    masks = {question: np.isin(labels, full_labels(classes)) for question, classes in question_classes.items()}
    everything = np.ones(len(labels), dtype=bool)
    return np.array([masks.get(str(question_id), everything) for question_id in question_ids]).reshape(len(question_ids), len(labels))


def full_labels(classes):
    """The Category:Misconception labels a model's classes decode to (label_probabilities' columns)."""
    labels = []
    for label in classes:
        labels += [label] if label.startswith(PREFIXES) else ["True_" + label, "False_" + label]
    return labels


def blend_probabilities(parts):
    """Weighted mean of [(weight, labels, probabilities)] over the union of their labels (absent label: 0)."""
    labels = sorted(set().union(*(part_labels for _, part_labels, _ in parts)))
    index = {label: column for column, label in enumerate(labels)}
    total = sum(weight for weight, _, _ in parts)
    blended = np.zeros((len(parts[0][2]), len(labels)))
    for weight, part_labels, probs in parts:
        blended[:, [index[label] for label in part_labels]] += (weight / total) * probs
    return labels, blended


def decode_top_k(probs, classes, correct, mask, fill_labels=(), k=TOP_K, allowed=None):
    """Top-k labels per row, as lists of k distinct strings.

    With `mask`, labels whose True_/False_ prefix contradicts the row's answer correctness (`correct`:
    True/False/None per row) rank below all others. `allowed` (rows x classes) leaves out the labels a row's
    question never has (a global model's other questions). Rows of fewer than k classes are filled from
    `fill_labels` (most frequent first).
    """
    classes = np.asarray(classes)
    scores = np.asarray(probs, dtype=np.float64).copy()
    if mask:
        is_true_label = np.char.startswith(classes.astype(str), "True_")
        for row, verdict in enumerate(correct):
            if verdict is not None:
                scores[row] += 2.0 * (is_true_label == verdict)
    if allowed is not None:
        scores[~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    decoded = []
    for row, row_order in enumerate(order):
        if allowed is not None:
            row_order = row_order[allowed[row, row_order]]
        labels = list(classes[row_order])
        labels += [label for label in fill_labels if label not in labels][: k - len(labels)]
        decoded.append(labels)
    return decoded


def frequency_probabilities(frequencies, rows):
    """Label frequencies as the same probabilities for each of `rows` rows (the label prior)."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    return np.tile(frequencies / max(frequencies.sum(), 1), (rows, 1))


def frequency_top_k(labels, frequencies, correct, mask, fill_labels=()):
    """Top-k labels per row from label frequencies alone (the label prior), under the same correctness mask."""
    return decode_top_k(frequency_probabilities(frequencies, len(correct)), labels, correct, mask, fill_labels)


# ---------------------------------------------------------------- models

# Tensor cores compute bf16 from compute capability 8.0 (A100) on; torch.cuda.is_bf16_supported() also counts
# the slow emulation that T4 (7.5) and V100 (7.0) offer.
BF16_COMPUTE_CAPABILITY = (8, 0)


def native_bf16(device):
    """Whether this CUDA device (not the current one) computes bf16 natively."""
    return torch.cuda.get_device_capability(device) >= BF16_COMPUTE_CAPABILITY


def describe_gpu(device):
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


@dataclass
class Backbone:
    """A base model on a device, in a precision, with its tokenizer; adapters and heads are attached in turn."""
    tokenizer: object
    model: torch.nn.Module
    precision: str
    device: str


def load_backbone(name, device, offline=False):
    precision = resolve_precision(config.PRECISION, device)
    tokenizer = load_tokenizer(name, offline)
    log.info("loading %s (%s on %s)", name, precision, device)
    return Backbone(tokenizer, load_base_model(name, tokenizer, TORCH_DTYPES[precision], device, offline), precision, device)


# CPUs with one of these compute bf16 natively; on others torch emulates it, slower than fp32.
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_emulates_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU lacks native bf16, by its flags in /proc/cpuinfo; False where that file does not exist."""
    try:
        with open(cpuinfo) as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not flags & CPU_BF16_FLAGS


EMULATED_BF16 = ("this CPU has no avx512_bf16 or amx_bf16, so torch emulates bf16, slower than fp32 (2.1x the time "
                 "of a MiniLM stand-in run, EXPERIMENTS.md); give --precision fp32")


@functools.cache
def warn_emulated_bf16():
    """Once per process: every model of a run resolves the precision again."""
    log.warning("--precision bf16: %s", EMULATED_BF16)


def resolve_precision(setting, device):
    """bf16 on GPUs with native bf16, fp16 on older GPUs (T4, V100), fp32 on CPU; an explicit setting wins."""
    device = torch.device(device)
    if setting != "auto":
        if setting == "bf16" and device.type == "cuda" and not native_bf16(device):
            raise InputError(f"--precision bf16: {describe_gpu(device)} has no native bf16 (needs 8.0); use fp16")
        if setting == "bf16" and device.type == "cpu" and cpu_emulates_bf16():
            warn_emulated_bf16()
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(name, offline=False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except OSError as error:
        raise InputError(f"--model {name}: cannot load tokenizer ({str(error).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(name, tokenizer, dtype, device, offline=False):
    """The base model with a placeholder head; `replace_head` gives it each question's head.

    `tokenizer` may be a Future of it (concurrent.futures): it is needed only once the model is loaded.
    """
    # transformers 5 renamed torch_dtype to dtype; 4.51 knows only torch_dtype.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=2, local_files_only=offline, **{dtype_key: dtype}
        )
    except OSError as error:
        raise InputError(f"--model {name}: cannot load model ({str(error).splitlines()[0]})") from None
    if isinstance(tokenizer, Future):
        tokenizer = tokenizer.result()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def adaptable_layers(name, offline=False):
    """{module name: module} of the layers of --model that LoRA can adapt (those with a 2-D weight: linear, Conv1D,
    embedding). The architecture is built from its config on the meta device: no weights are read or allocated."""
    try:
        model_config = transformers.AutoConfig.from_pretrained(name, local_files_only=offline)
    except OSError as error:
        raise InputError(f"--model {name}: cannot load its config ({str(error).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(model_config)
    return {module_name: module for module_name, module in model.named_modules()
            if not any(module.children()) and getattr(module, "weight", None) is not None and module.weight.dim() == 2}


def lora_targets_layer(target, name):
    """peft's rule: a target names a layer by its whole name or a dotted end of it ("q_proj", "self_attn.q_proj")."""
    return name == target or name.endswith("." + target)


def unmatched_lora_targets(layers, targets):
    """The --lora-targets that name none of `layers` (peft adapts a partial match without a word: a typo would
    quietly train fewer layers)."""
    return [target for target in targets if not any(lora_targets_layer(target, name) for name in layers)]


def head_name(model):
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Linear):
            return name
    raise InputError(f"{type(model).__name__}: no classification head named {' or '.join(HEAD_NAMES)}")


def replace_head(model, num_labels, bias=None):
    """Give the model a fresh head of num_labels outputs (sizes differ between questions).

    The head always has a bias (Qwen3's own has none), set to `bias` (e.g. the log label prior, so training does
    not begin by learning the label frequencies) or to zeros.
    """
    name = head_name(model)
    old = getattr(model, name)
    new = torch.nn.Linear(old.in_features, num_labels, bias=True, dtype=old.weight.dtype, device=old.weight.device)
    torch.nn.init.normal_(new.weight, std=getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        new.bias.copy_(torch.zeros(num_labels) if bias is None else torch.as_tensor(bias))
    setattr(model, name, new)
    model.config.num_labels = num_labels
    if hasattr(model, "num_labels"):  # BERT's loss reads the attribute, Qwen3's the config
        model.num_labels = num_labels
    return name


class NonFiniteLogits(ValueError):
    """The model gives NaN or infinite logits even in fp32: its predictions are meaningless."""


@contextlib.contextmanager
def in_fp32(model):
    """Run the model in fp32 inside; its own tensors (fp16/bf16 base, fp32 LoRA) are put back exactly after."""
    tensors = [tensor for tensor in [*model.parameters(), *model.buffers()] if tensor.is_floating_point() and tensor.dtype != torch.float32]
    originals = [tensor.data for tensor in tensors]
    for tensor in tensors:
        tensor.data = tensor.data.float()
    try:
        yield model
    finally:
        for tensor, data in zip(tensors, originals):
            tensor.data = data


@torch.inference_mode()
def predict_logits(model, input_ids, collator, batch_size, precision):
    """Logits for each row (in input order), batches cut from rows sorted by length to minimise padding
    (data_collator.padding_batch_sizes), the longest first: an out-of-memory error shows at once.

    A batch with non-finite logits (an fp16 overflow) is recomputed in fp32; still non-finite raises
    NonFiniteLogits.
    """
    device = next(model.parameters()).device
    lengths = np.array([len(ids) for ids in input_ids], dtype=int)
    order = np.argsort(lengths, kind="stable")
    batches = sorted_batches(order, padding_batch_sizes(lengths[order], batch_size))
    was_training = model.training
    model.eval()
    outputs = np.zeros((len(input_ids), model.config.num_labels), dtype=np.float32)
    autocast = torch.autocast(device.type, dtype=TORCH_DTYPES[precision], enabled=precision != "fp32")
    try:
        for rows in reversed(batches):
            batch = collator([{"input_ids": input_ids[i]} for i in rows]).to(device)
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if not torch.isfinite(logits).all():
                with in_fp32(model):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                if not torch.isfinite(logits).all():
                    raise NonFiniteLogits(f"non-finite logits for {len(rows)} rows even in fp32")
                log.warning("non-finite logits in %s for a batch of %d rows: recomputed in fp32", precision, len(rows))
            outputs[rows] = logits.cpu().numpy()
    finally:
        model.train(was_training)
    return outputs


def attach_lora(base_model, lora_config, num_labels, trainable=True, head_bias=None):
    """Wrap the base model in place with LoRA layers and a fresh head; `model.unload()` gives it back clean.

    Trainable weights are kept in fp32 (optimizer, fp16 grad scaling); for inference everything takes
    the base model's dtype.
    """
    replace_head(base_model, num_labels, head_bias)
    model = get_peft_model(base_model, lora_config, autocast_adapter_dtype=trainable)
    if trainable:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return model


# A newer peft writes fields an older one lacks; these two mean nothing for an adapter that uses no newer feature.
INERT_LORA_FIELDS = {"peft_version", "qalora_group_size"}


def read_lora_config(adapter_dir):
    """The saved LoraConfig, without the fields of a newer peft whose features are off (None, False, empty).

    A newer feature that is on raises: this peft would load the adapter wrongly.
    """
    saved = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    unknown = {name: value for name, value in saved.items() if name not in known}
    used = [name for name, value in unknown.items() if name not in INERT_LORA_FIELDS and value not in (None, False, [], {})]
    if used:
        raise ValueError(f"{adapter_dir}: adapter uses {', '.join(used)}, unknown to peft {peft.__version__}; upgrade peft")
    return LoraConfig(**{name: value for name, value in saved.items() if name in known})


def load_adapter(base_model, adapter_dir, num_labels):
    """Attach a saved adapter and head to the shared base model.

    The weights are read and checked before the base model is touched, so a missing or corrupt adapter
    raises without leaving LoRA layers behind.
    """
    state_dict = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora_config = read_lora_config(adapter_dir)
    heads = {key: value for key, value in state_dict.items() if key.split(".")[-2] in HEAD_NAMES and key.endswith("weight")}
    if not heads or any(value.shape[0] != num_labels for value in heads.values()):
        raise ValueError(f"{adapter_dir}: head does not have {num_labels} outputs")
    model = attach_lora(base_model, lora_config, num_labels, trainable=False)
    return load_weights(model, state_dict, adapter_dir).eval()


def load_weights(model, state_dict, adapter_dir):
    """Load a saved adapter's weights into the attached model; on any failure the base model is left clean."""
    try:
        result = set_peft_model_state_dict(model, state_dict)
        if result.unexpected_keys:
            raise ValueError(f"{adapter_dir}: unexpected weights {result.unexpected_keys[:3]}")
    except Exception:
        model.unload()
        raise
    return model


def attach_lora_from(base_model, adapter_dir, head_rows):
    """Attach a trainable copy of a saved adapter whose head keeps only the outputs `head_rows`, in that order.

    Started from a global model's adapter with the rows of one question's labels, the model predicts at step 0
    what the global model predicts for that question, restricted to its labels.
    """
    state_dict = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora_config = read_lora_config(adapter_dir)
    lora_config.inference_mode = False
    rows = torch.as_tensor(head_rows, dtype=torch.long)
    state_dict = {key: value[rows] if key.split(".")[-2] in HEAD_NAMES else value for key, value in state_dict.items()}
    return load_weights(attach_lora(base_model, lora_config, len(head_rows)), state_dict, adapter_dir)


@contextlib.contextmanager
def lora_merged(model):
    """Fold the LoRA weights into the base weights while inside (no extra LoRA matmuls per layer).

    The base weights are copied first and put back exactly afterwards: unmerging by subtraction would drift
    in fp16/bf16, and the base model serves every question.
    """
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    try:
        model.merge_adapter()  # inside: a merge that fails halfway (out of memory) is undone too
        yield model
    finally:
        for layer, weight in zip(layers, originals):
            layer.get_base_layer().weight.data.copy_(weight)
            layer.merged_adapters.clear()
