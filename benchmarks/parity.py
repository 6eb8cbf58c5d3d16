"""The model submit.py runs against the model train.py validated, merged LoRA against unmerged, at each precision.

    python benchmarks/parity.py --model /work/minilm --output-dir RUN --train-data train.csv --precisions fp32,bf16,fp16

For every model of a trained run (each question's, and the global one) and its validation rows (the run's
oof_<--checkpoint>.csv; out of fold when the run has one split), at each precision:
- validated: train.py's evaluation path, the base loaded by utils.load_backbone, the saved adapter attached
  trainable (LoRA and head in fp32, utils.attach_lora_from), utils.predict_logits under autocast;
- unmerged and merged: submit.py's Predictor (its fold_probabilities) with --merge-lora off and on.
Printed per precision: the largest probability difference from the validated model, the share of rows whose
top 3 (in order) is the validated model's, MAP@3 of each, and merged minus unmerged MAP@3, paired over the rows
with a 95% interval. The reference for "validated" is the same precision's evaluation path; fp32's is shown too.
The last line is one JSON object. Only public functions of the project are called; none is patched.
"""
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import submit  # noqa: E402
from data_collator import build_data_collator  # noqa: E402
from prompts import encode_prompts  # noqa: E402
from utils import (TARGET_COLUMN, TORCH_DTYPES, InputError, allowed_classes, attach_lora_from, average_precisions,  # noqa: E402
                   correctness_of, decode_top_k, label_probabilities, load_backbone, load_base_model, map_at_k,
                   paired_difference, predict_logits, question_label_mask, read_competition_csv, read_question_results,
                   setup_logging)

torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))


def extra_arguments(parser):
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="precisions to compare, in turn")
    parser.add_argument("--max-rows", type=int, default=0, help="most validation rows per model (0: all)")


def validation_rows(question_id, df):
    """The rows of --questions a model was validated on (its oof file), in the training file's form."""
    path = os.path.join(config.get_question_output_dir(question_id), f"oof_{config.CHECKPOINT}.csv")
    scored = pd.read_csv(path, keep_default_na=False, dtype={"row_id": str}, usecols=["row_id"])["row_id"]
    rows = df.set_index("row_id").loc[scored].reset_index()
    return rows[rows["QuestionId"].isin(config.QUESTION_IDS)].reset_index(drop=True)


def validated_probabilities(backbone, question_id, rows, result):
    """train.py's evaluation path: (full labels, probabilities of each fold model)."""
    classes = submit.question_classes(question_id, result)
    allowed = allowed_classes(rows["QuestionId"], classes, result["question_classes"]) if question_id == config.GLOBAL else None
    input_ids, _ = encode_prompts(rows, backbone.tokenizer, result["prompt_version"], result["max_len"])
    collator = build_data_collator(backbone.tokenizer, config.PAD_TO_MULTIPLE_OF)
    folds = result.get("folds", 1)
    probs = []
    for fold in [None] if folds == 1 else range(folds):
        model = attach_lora_from(backbone.model, config.get_question_model_path(question_id, fold=fold), list(range(len(classes))))
        try:
            logits = predict_logits(model, input_ids, collator, config.EVAL_BATCH_SIZE, backbone.precision)
        finally:
            model.unload()
        labels, fold_probs = label_probabilities(logits, classes, correctness_of(rows), allowed)
        probs.append(fold_probs)
    return labels, probs


def ways_of_predicting(backbone, predictor, question_id, rows, result):
    """{validated, unmerged, merged: (full labels, mean probabilities over the fold models, top 3 per row)}."""
    ways = {"validated": validated_probabilities(backbone, question_id, rows, result)}
    for name, merge in (("unmerged", False), ("merged", True)):
        config.update({"MERGE_LORA": merge})
        ways[name] = predictor.fold_probabilities(question_id, rows, result)
    allowed = None
    if question_id == config.GLOBAL:
        allowed = question_label_mask(rows["QuestionId"], ways["validated"][0], result["question_classes"])
    decoded = {}
    for name, (labels, probs) in ways.items():
        probs = np.mean(probs, axis=0)
        decoded[name] = (labels, probs, decode_top_k(probs, labels, correctness_of(rows), config.CORRECTNESS_MASK, allowed=allowed))
    return decoded


def compare(results, df, precision, device, max_rows):
    """Every model's validation rows predicted the three ways at one precision: the figures main prints."""
    config.update({"PRECISION": precision})
    started = time.perf_counter()
    backbone = load_backbone(config.MODEL_NAME, device, offline=True)
    predictor = submit.Predictor(load_base_model(config.MODEL_NAME, backbone.tokenizer, TORCH_DTYPES[backbone.precision], "cpu",
                                                 offline=True), backbone.tokenizer, device)
    truth, top3, largest = [], {"validated": [], "unmerged": [], "merged": []}, {"unmerged": 0.0, "merged": 0.0}
    for question_id, result in results.items():
        rows = validation_rows(question_id, df)
        rows = rows.iloc[:max_rows] if max_rows else rows
        ways = ways_of_predicting(backbone, predictor, question_id, rows, result)
        labels, reference, _ = ways["validated"]
        for name in largest:
            assert ways[name][0] == labels
            largest[name] = max(largest[name], float(np.abs(ways[name][1] - reference).max()))
        for name in top3:
            top3[name] += ways[name][2]
        truth += list(rows[TARGET_COLUMN])
    gain = average_precisions(truth, top3["merged"]) - average_precisions(truth, top3["unmerged"])
    mean, interval = paired_difference(gain)
    return {
        "rows": len(truth), "seconds": time.perf_counter() - started, "max_prob_diff": largest,
        "top3_same": {name: float(np.mean([a == b for a, b in zip(top3[name], top3["validated"])])) for name in largest},
        "map3": {name: map_at_k(truth, ranked) for name, ranked in top3.items()},
        "merged_minus_unmerged": mean, "interval": list(interval),
    }


def main(argv=None):
    args = config.parse_args(__doc__.splitlines()[0], "parity", argv, extra_arguments=extra_arguments)
    setup_logging()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    merge_default = config.MERGE_LORA
    try:
        df = read_competition_csv(config.TRAIN_DATA_PATH, labelled=True)
        results = {question_id: result for question_id, result in read_question_results([*config.QUESTION_IDS, config.GLOBAL]).items()
                   if result.get("status") == "succeeded"}
        if not results:
            raise InputError(f"--output-dir {config.OUTPUT_DIR}: no succeeded model to compare")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    figures = {precision: compare(results, df, precision, device, args.max_rows) for precision in precisions}
    config.update({"MERGE_LORA": merge_default})
    print(f"models: {', '.join(map(str, results))} of {config.OUTPUT_DIR} ({config.CHECKPOINT}); device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':10}{'rows':>7}{'max |dp| unmerged':>19}{'merged':>9}{'top-3 same unmerged':>21}{'merged':>9}"
          f"{'MAP@3 validated':>17}{'unmerged':>10}{'merged':>9}  merged - unmerged (95%)")
    for precision, f in figures.items():
        low, high = f["interval"]
        print(f"{precision:10}{f['rows']:>7}{f['max_prob_diff']['unmerged']:>19.1e}{f['max_prob_diff']['merged']:>9.1e}"
              f"{f['top3_same']['unmerged']:>21.4f}{f['top3_same']['merged']:>9.4f}{f['map3']['validated']:>17.4f}"
              f"{f['map3']['unmerged']:>10.4f}{f['map3']['merged']:>9.4f}  {f['merged_minus_unmerged']:+.4f} ({low:+.4f} to {high:+.4f})")
    summary = {"device": device, "models": [str(q) for q in results], "precisions": figures}
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 2)
