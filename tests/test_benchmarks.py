"""benchmarks/run.py and benchmarks/gpu.py on synthetic data with the tiny Qwen3: they run and what they
report adds up (every token counted once, padding flags honoured, one base-model load)."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import config
from conftest import SINGLE_CLASS_QUESTION
from prompts import encode_prompts
from utils import TARGET_COLUMN, load_tokenizer, read_competition_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = 31772
SUBMIT_ROWS = 30
EPOCHS = 2


def load_script(name):
    """benchmarks/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def one_thread():
    """These tests check figures, not speed: one thread runs the tiny model fastest on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_benchmark(*argv):
    """run.py's main in this process; returns its printed output and its last line parsed as JSON."""
    saved = config.snapshot()  # the script writes its settings into config
    output = io.StringIO()
    script = load_script("run")
    try:
        with contextlib.redirect_stdout(output), one_thread():
            script.main(list(argv))
    finally:
        config.update(saved)
    text = output.getvalue()
    return text, json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_csv(train_csv, tmp_path_factory):
    """Three questions of the synthetic data, the single-class one among them: padding is measured on
    every question of the file, and fewer keep the tests fast."""
    df = read_competition_csv(train_csv, labelled=True)
    path = tmp_path_factory.mktemp("bench") / "train.csv"
    df[df["QuestionId"].isin([QUESTION, 33471, SINGLE_CLASS_QUESTION])].drop(columns=[TARGET_COLUMN]).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def bench(tiny_model, small_csv):
    return run_benchmark("--train-data", small_csv, "--model", tiny_model, "--questions", str(QUESTION), "--rows", "40",
                         "--epochs", str(EPOCHS), "--submit-rows", str(SUBMIT_ROWS))


@pytest.fixture(scope="module")
def prompt_lengths(tiny_model, small_csv):
    """Tokens of every row's prompt (the default version), per QuestionId, computed here independently."""
    df = read_competition_csv(small_csv, labelled=True)
    input_ids, _ = encode_prompts(df, load_tokenizer(tiny_model), config.PROMPT_VERSION, config.MAX_LEN)
    lengths = {}
    for question_id, ids, label in zip(df["QuestionId"], input_ids, df[TARGET_COLUMN]):
        lengths.setdefault(question_id, []).append((len(ids), label))
    return lengths


def test_run_reports_every_figure_with_sane_values(bench):
    text, result = bench
    for key in ("padding_efficiency_train", "padding_efficiency_infer", "padding_efficiency_train_run", "padding_efficiency_submit"):
        assert 0 < result[key] <= 1, key
    assert result["base_loads"] == 1
    # The forward passes are part of submit's wall time, and the ratio is the two times divided.
    assert 0 < result["submit_forward_s"] < result["submit_wall_s"]
    assert result["submit_overhead_ratio"] == pytest.approx(result["submit_wall_s"] / result["submit_forward_s"])
    assert result["submit_rows"] == SUBMIT_ROWS
    assert result["submit_rows_per_s"] == pytest.approx(SUBMIT_ROWS / result["submit_wall_s"])
    assert sum(result["submit_seconds"].values()) == pytest.approx(result["submit_wall_s"])
    # Where the time outside the forward passes goes: every stage a one-model submit goes through is seen, once
    # (the remainder is not negative: no stage's time is counted twice).
    seconds = result["submit_seconds"]
    for stage in ("load base model", "encode prompts", "attach adapters", "detach adapters", "merge LoRA, restore base weights",
                  "batches and collation", "answer correctness", "decode top-3", "write and check submission"):
        assert seconds[stage] > 0, stage
    assert seconds["other (not in a stage above)"] > -1e-3 and result["submit_tokenizer_load_s"] > 0
    assert seconds["forward passes"] == result["submit_forward_s"]
    assert result["train_tokens_per_s"] > result["train_wall_tokens_per_s"] > 0
    assert result["train_evaluations"] >= 1 and result["train_evaluate_s"] > 0
    assert result["peak_rss_mb"] > 100 and result["submit_import_s"] > 0
    assert "padding efficiency" in text and "submit.py" in text


def test_prompt_lengths_are_those_of_encode_prompts(bench, prompt_lengths):
    stats = bench[1]["prompt_tokens"][config.PROMPT_VERSION]
    lengths = [length for rows in prompt_lengths.values() for length, _ in rows]
    assert stats["rows"] == len(lengths)
    assert stats["max_tokens"] == max(lengths)
    assert stats["mean_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    assert set(bench[1]["prompt_tokens"]) == {"create_prompt_v1", "create_prompt_v2", "create_prompt_global"}


def test_padding_counts_every_token_once(bench, prompt_lengths):
    result = bench[1]
    # Inference: every row of every question is predicted once.
    assert result["infer_tokens_real"] == sum(length for rows in prompt_lengths.values() for length, _ in rows)
    assert result["infer_tokens_real"] / result["infer_tokens_computed"] == pytest.approx(result["padding_efficiency_infer"])
    # Training: each epoch sees the training split (about 1 - VAL_FRACTION of the rows) of every question
    # with more than one class; the single-class question is skipped, as train.py skips it.
    trainable = sum(length for rows in prompt_lengths.values() if len({label for _, label in rows}) > 1 for length, _ in rows)
    per_epoch = result["train_tokens_real"] / EPOCHS
    assert (1 - config.VAL_FRACTION - 0.05) * trainable < per_epoch < (1 - config.VAL_FRACTION + 0.05) * trainable
    assert result["train_tokens_computed"] >= result["train_tokens_real"]


def test_padding_to_a_multiple_costs_efficiency(bench, tiny_model, small_csv):
    """--pad-to-multiple-of reaches the project's collator in both the training and the inference batches."""
    _, padded = run_benchmark("--train-data", small_csv, "--model", tiny_model, "--epochs", str(EPOCHS),
                              "--pad-to-multiple-of", "64", "--padding-only")
    unpadded = bench[1]
    for kind in ("train", "infer"):
        assert padded[f"{kind}_tokens_real"] == unpadded[f"{kind}_tokens_real"]
        assert padded[f"{kind}_tokens_computed"] % 64 == 0
        assert padded[f"padding_efficiency_{kind}"] < unpadded[f"padding_efficiency_{kind}"]
    assert "submit_overhead_ratio" not in padded


def test_gpu_script_runs_tiny_on_cpu():
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    finished = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny", "--seconds", "300",
                               "--batch-size", "8", "--eval-batch-size", "8", "--precisions", "fp32,fp16"], cwd=ROOT,
                              env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    for key in ("train_tokens_per_s", "mfu", "projected_full_train_s", "infer_rows_per_s", "projected_16000_rows_s",
                "peak_gpu_memory_mb", "prompt_tokens", "precisions"):
        assert key in result, key
    assert result["tiny"] and result["rows_source"] == "synthetic"
    # bf16 works on CPU too but is slow there; fp32 exercises the same code.
    assert set(result["precisions"]) == {"fp32", "fp16"}
    assert "skipped" in result["precisions"]["fp16"]  # fp16 autocast is a GPU path
    training, inference = result["precisions"]["fp32"]["train"], result["precisions"]["fp32"]["infer"]
    # --tiny: 4 steps, the first one left out as warm-up; batches of 8 / 4 to 2 x 8 rows (padding_batch_sizes).
    assert training["steps"] == 3 and 3 * 2 <= training["rows"] <= 3 * 16
    assert 0 < training["padding_efficiency"] <= 1 and 0 < result["mfu"] < 1
    assert training["mfu_executed"] < training["mfu"]  # frozen weights get no weight gradients
    # LoRA r64 on q/k/v/o of the tiny config (hidden 64, 4 heads x 16, 2 kv heads x 16, 2 layers), and a head.
    lora = 2 * 64 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert lora < training["parameters_lora"] < lora + 64 * 100
    assert result["projected_full_train_s"] == pytest.approx(36696 * config.EPOCHS / training["rows_per_s"])
    assert inference["rows"] == 32 and inference["rows_per_s"] > 0
    assert result["projected_16000_rows_s"] == pytest.approx(16000 / inference["rows_per_s"])
    # The submit path's records: submit.py's Predictor against train.py's evaluation at each precision (fp16 too: its
    # inference autocasts on CPU), and the global model's pass on one "device" and on two, over the same rows.
    checks = result["submit_path"]
    assert set(checks["parity"]) == {"fp32", "fp16"} and checks["parity"]["fp32"]["rows"] > 0
    assert max(checks["parity"]["fp32"]["max_prob_diff"].values()) < 1e-6
    one, two = checks["global_pass"]["1"], checks["global_pass"]["2"]
    assert one["rows"] == two["rows"] == 64 and one["seconds"] > 0 and two["seconds"] > 0


def test_gpu_script_reads_real_rows(train_csv):
    """--train-data: the token lengths of that file's rows (sampled to --rows), as encode_prompts makes them."""
    output = io.StringIO()
    script = load_script("gpu")
    with contextlib.redirect_stdout(output), one_thread():
        result = script.main(["--tiny", "--train-data", train_csv, "--rows", "64", "--batch-size", "8",
                                          "--eval-batch-size", "8", "--max-steps", "2", "--precisions", "fp32", "--seconds", "300"])
    assert json.loads(output.getvalue().strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["rows_source"] == train_csv and result["rows"] == 64
    assert result["prompt_tokens"]["rows"] == 64 and result["prompt_tokens"]["max_tokens"] <= config.MAX_LEN
    training = result["precisions"]["fp32"]["train"]
    assert training["steps"] == 1 and 2 <= training["rows"] <= 16  # one batch of 8 / 4 to 2 x 8 rows


def test_baseline_scores_every_row_out_of_fold(train_csv, capsys, tmp_path):
    import pandas as pd
    baseline = load_script("baseline")
    baseline.main(["--train-data", train_csv, "--questions", "31772,33471", "--folds", "3", "--output-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    rows = read_competition_csv(train_csv, labelled=True)["QuestionId"].value_counts()
    assert lines[0].startswith(f"question 31772: val rows {rows[31772]}, MAP@3 ")
    assert lines[1].startswith(f"question 33471: val rows {rows[33471]}, MAP@3 ")
    overall = float(lines[2].split("MAP@3 ")[1].split()[0])
    assert 0.5 < overall <= 1.0  # the synthetic explanations carry the label's words
    # Its out-of-fold file, in train.py's format: every row of the question once, in train.py's folds.
    oof = pd.read_csv(tmp_path / "question_33471" / "oof_best.csv", keep_default_na=False, dtype={"row_id": str})
    train = read_competition_csv(train_csv, labelled=True)
    assert sorted(oof["row_id"]) == sorted(train.loc[train["QuestionId"] == 33471, "row_id"])
    assert sorted(set(oof["fold"])) == [0, 1, 2]
    assert np.allclose(oof.iloc[:, 3:].sum(axis=1), 1.0)


def test_fold_ensemble_scores_match_submit_on_the_held_out_rows(tiny_model, train_csv, tmp_path):
    import pandas as pd

    import submit
    from conftest import train_args
    from utils import map_at_k
    fold_ensemble = load_script("fold_ensemble")
    output_dir = tmp_path / "run"
    with one_thread():
        results = fold_ensemble.main(train_args(tiny_model, train_csv, output_dir, "--questions", "33471,31772", "--folds", "2",
                                                    "--epochs", "1"))
    data = read_competition_csv(train_csv, labelled=True)
    data = data[data["QuestionId"].isin([33471, 31772])]
    dev = read_competition_csv(str(output_dir / "dev.csv"), labelled=True)
    holdout = data[~data["row_id"].isin(dev["row_id"])]
    assert len(dev) + len(holdout) == len(data) and sum(q["rows"] for q in results["per_question"].values()) == len(holdout)
    assert all(len(q["folds"]) == 2 for q in results["per_question"].values())
    # submit.py averages the same fold models: its MAP@3 on the held-out rows is the ensemble's.
    test_path, submission_path = tmp_path / "holdout.csv", tmp_path / "submission.csv"
    holdout.drop(columns=["Category", "Misconception"]).to_csv(test_path, index=False)
    assert submit.main(["--model", tiny_model, "--output-dir", str(output_dir), "--test-data", str(test_path),
                        "--submission", str(submission_path)]) == 0
    predicted = pd.read_csv(submission_path, keep_default_na=False, dtype=str).set_index("row_id").loc[holdout["row_id"]]
    submitted = map_at_k(holdout[TARGET_COLUMN].tolist(), [labels.split() for labels in predicted.iloc[:, 0]])
    assert submitted == pytest.approx(results["overall"]["ensemble"], abs=1e-9)


def test_heldout_scores_what_submit_writes_for_the_held_out_rows(tiny_model, train_csv, tmp_path):
    import pandas as pd

    import submit
    from conftest import train_args
    from utils import map_at_k
    heldout = load_script("heldout")
    output_dir = tmp_path / "run"
    with one_thread():
        record = heldout.main(train_args(tiny_model, train_csv, output_dir, "--questions", "33471", "--folds", "2",
                                         "--epochs", "1", "--seeds", "3,4"))
    assert list(record["variants"]) == ["seed 3", "seed 4", "2 seeds averaged"]
    assert record["baseline"] == "seed 3" and record["variants"]["seed 3"]["minus_baseline"]["mean"] == 0
    data = read_competition_csv(train_csv, labelled=True)
    dev = read_competition_csv(str(output_dir / "dev.csv"), labelled=True)
    holdout = data[(data["QuestionId"] == 33471) & ~data["row_id"].isin(dev["row_id"])]
    assert record["rows"] == len(holdout) and len(dev[dev["QuestionId"] == 33471]) + len(holdout) == (data["QuestionId"] == 33471).sum()
    # submit.py on the held-out rows averages the two seeds: its MAP@3 is the average's.
    test_path, submission_path = tmp_path / "holdout.csv", tmp_path / "submission.csv"
    holdout.drop(columns=["Category", "Misconception"]).to_csv(test_path, index=False)
    assert submit.main(["--model", tiny_model, "--output-dir", str(output_dir), "--test-data", str(test_path),
                        "--questions", "33471", "--submission", str(submission_path)]) == 0
    predicted = pd.read_csv(submission_path, keep_default_na=False, dtype=str).set_index("row_id").loc[holdout["row_id"]]
    submitted = map_at_k(holdout[TARGET_COLUMN].tolist(), [labels.split() for labels in predicted.iloc[:, 0]])
    assert submitted == pytest.approx(record["variants"]["2 seeds averaged"]["map3"], abs=1e-9)


def test_compare_oof_scores_rows_in_pairs(tmp_path):
    import pandas as pd
    compare_oof = load_script("compare_oof")
    classes = ["False_Correct:NA", "False_Neither:NA", "True_Correct:NA", "True_Neither:NA"]
    # QuestionId 999 is not a known question: no correctness mask, so the ranks below are the probabilities' order.
    pd.DataFrame({"row_id": ["1", "2", "3", "4"], "QuestionId": 999, "QuestionText": "q", "MC_Answer": "a",
                  "StudentExplanation": ["w", "x", "y", "z"], "Category": [label.split(":")[0] for label in classes],
                  "Misconception": "NA"}
                 ).to_csv(tmp_path / "train.csv", index=False)
    truth = classes
    exact = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]
    # Truth ranked 2nd, 2nd, 4th and 1st: MAP@3 (1/2 + 1/2 + 0 + 1) / 4.
    worse = [[0.3, 0.6, 0.05, 0.05], [0.6, 0.3, 0.05, 0.05], [0.4, 0.3, 0.0, 0.3], [0.1, 0.1, 0.1, 0.7]]
    for run, probs in (("a", exact), ("b", worse)):
        os.makedirs(tmp_path / run / "question_999")
        oof = pd.DataFrame(probs, columns=classes)
        oof.insert(0, "row_id", ["1", "2", "3", "4"])
        oof.insert(1, "fold", [0, 1, 0, 1])
        oof.insert(2, "label", truth)
        oof.to_csv(tmp_path / run / "question_999" / "oof_best_map3.csv", index=False)
    # The same rows as a global model's file: one file for every question, under global/.
    os.makedirs(tmp_path / "g" / "global")
    oof.to_csv(tmp_path / "g" / "global" / "oof_best_map3.csv", index=False)
    for run_b in ("b", "g/global"):
        per_question, compared = compare_oof.main(["--train-data", str(tmp_path / "train.csv"), str(tmp_path / "a"),
                                                   str(tmp_path / run_b), "--blend-weights", "0.5,1"])
        assert per_question[999] == (4, {"A": pytest.approx(1.0), "B": pytest.approx(0.5),
                                         # 0.5 exact + 0.5 worse ranks every truth first again; weight 1 is B.
                                         "blend 0.5": pytest.approx(1.0), "blend 1": pytest.approx(0.5)})
        (name, difference, (low, high)), blend_half, blend_one = compared
        assert name == "B" and difference == pytest.approx(-0.5) and -1.0 <= low <= -0.5 <= high <= 0.0
        assert blend_half[1] == pytest.approx(0.0) and blend_one[1] == pytest.approx(-0.5)
    oof.drop(index=3).to_csv(tmp_path / "b" / "question_999" / "oof_best_map3.csv", index=False)
    with pytest.raises(SystemExit, match="different rows"):
        compare_oof.main(["--train-data", str(tmp_path / "train.csv"), str(tmp_path / "a"), str(tmp_path / "b")])


def test_memory_counts_parameters_and_lora_as_the_formulas_do(capsys):
    """The tiny config: parameters and LoRA parameters as counted by hand, activations measured (their sizes vary
    by CPU kernel, so only their relations are checked)."""
    with one_thread():
        figures = load_script("memory").main(["--tiny"])["tiny"]
    hidden, intermediate, layers, heads, kv_heads = 64, 128, 2, 4, 2
    query, key_value = heads * 16, kv_heads * 16
    attention = hidden * query + 2 * hidden * key_value + query * hidden
    layer = attention + 2 * 16 + 3 * hidden * intermediate + 2 * hidden  # q/k norms, MLP, two norms
    assert figures["parameters"] == 151936 * hidden + layers * layer + hidden
    assert figures["adapted_parameters"] == layers * attention
    rank = config.LORA_RANK
    assert figures["lora"] == layers * rank * ((hidden + query) + 2 * (hidden + key_value) + (query + hidden))
    # A layer keeps far more than its input, which is all a checkpointed one keeps.
    assert figures["layer_bytes_per_token"] > 10 * figures["checkpointed_layer_bytes_per_token"] == 20 * hidden
    # The first layer keeps less than the others: nothing below it needs a gradient.
    assert 0 < figures["one_layer_model_bytes_per_token"] < 2 * figures["layer_bytes_per_token"]
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["run", "gpu", "memory", "parity"])
def test_benchmarks_patch_none_of_the_project(name):
    """They call the project's public functions: no attribute of a project module is replaced or patched."""
    import ast
    project = {"train", "submit", "utils", "prompts", "prompt_utils", "data_collator"}
    tree = ast.parse(open(os.path.join(ROOT, "benchmarks", f"{name}.py")).read())

    def owner(node):
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    replaced = [ast.unparse(target) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Attribute) and owner(target) in project]
    patched = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
               and ast.unparse(node.func).split(".")[-1] in ("object", "setattr") and owner(node.args[0]) in project]
    assert replaced == [] and patched == []


def test_parity_script_compares_validated_unmerged_and_merged(trained, tiny_model, train_csv):
    """benchmarks/parity.py on the trained run's validation rows: in fp32 the three ways agree to rounding, in bf16
    within the parity test's tolerance (tests/test_submit.py), and every validation row is counted once."""
    saved = config.snapshot()
    try:
        with contextlib.redirect_stdout(io.StringIO()), one_thread():
            summary = load_script("parity").main(["--model", tiny_model, "--train-data", train_csv, "--output-dir",
                                                  trained["output_dir"], "--questions", "31772,33471", "--precisions", "fp32,bf16"])
    finally:
        config.update(saved)
    rows = sum(len(pd.read_csv(os.path.join(trained["output_dir"], f"question_{q}", "oof_best_map3.csv"))) for q in (31772, 33471))
    fp32, bf16 = summary["precisions"]["fp32"], summary["precisions"]["bf16"]
    assert fp32["rows"] == bf16["rows"] == rows
    assert max(fp32["max_prob_diff"].values()) < 1e-6
    assert fp32["map3"]["validated"] == fp32["map3"]["unmerged"] == fp32["map3"]["merged"]
    assert 0 < max(bf16["max_prob_diff"].values()) < 2e-2 and min(bf16["top3_same"].values()) >= 0.99
    low, high = bf16["interval"]
    assert low <= bf16["merged_minus_unmerged"] <= high


def test_gpu_script_scaling_on_cpu():
    """--scaling on CPU: the global model's epoch on 1 process of 2 threads and on 2 of 1 (torchrun)."""
    environment = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    finished = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny", "--scaling",
                               "--rows", "600", "--batch-size", "8"], cwd=ROOT, env=environment, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    runs = json.loads(finished.stdout.strip().splitlines()[-1])["scaling"]
    assert set(runs) == {"1", "2"}
    assert [runs[count]["threads_per_process"] for count in ("1", "2")] == [2, 1]
    assert runs["1"]["train_rows"] == runs["2"]["train_rows"]
    # --batch-size is per process: two processes take half the steps, rounded up.
    assert runs["2"]["steps"] == (runs["1"]["steps"] + 1) // 2
    assert all(run["seconds"] > 0 for run in runs.values())
