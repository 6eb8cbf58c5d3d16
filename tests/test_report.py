"""What a person sees: the demo's terminal output, its tables, and the two summary pictures."""
import glob
import json
import os
import re
import subprocess
import sys
import types

import pandas as pd
import pytest

import config
import report
from utils import read_json, read_question_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [31772, 33471]
EVALUATION = re.compile(r"step \d+: validation MAP@3 ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """train.py --demo then submit.py --demo on two questions with two folds, output as a pipe gets it."""
    output_dir = str(tmp_path_factory.mktemp("demo") / "ver_demo")
    flags = ["--demo", "--demo-output-dir", output_dir, "--questions", ",".join(map(str, QUESTIONS))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = []
    for command in (["train.py", *flags, "--folds", "2", "--epochs", "3"], ["submit.py", *flags]):
        run = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append((run.stdout + run.stderr).splitlines())
    return {"output_dir": output_dir, "train": outputs[0], "submit": outputs[1]}


def evaluations_logged(output_dir):
    """Every evaluation the Trainers recorded (the global model and the questions): {log file: count}."""
    counts = {}
    for path in glob.glob(f"{output_dir}/*/logs/log_history_fold_*.json"):
        counts[path] = sum("eval_map3" in entry for entry in read_json(path))
    return counts


def test_each_evaluation_is_printed_once_and_kept_in_the_question_log(demo):
    printed = [line for line in demo["train"] if EVALUATION.search(line)]
    assert len(printed) == sum(evaluations_logged(demo["output_dir"]).values()) > 0
    assert not [line for line in demo["train"] if "eval_loss" in line or "'loss'" in line or "train_runtime" in line]
    for question_id in QUESTIONS:
        with open(os.path.join(demo["output_dir"], f"question_{question_id}", "logs", "train.log")) as handle:
            kept = [line for line in handle if EVALUATION.search(line)]
        assert len(kept) == sum(n for path, n in evaluations_logged(demo["output_dir"]).items() if f"question_{question_id}/" in path)


def test_known_third_party_noise_is_gone(demo):
    output = "\n".join(demo["train"] + demo["submit"])
    for noise in ("is_gradient_checkpointing", "FutureWarning", "Using categorical units", "Loading weights", "Writing model shards"):
        assert noise not in output


def test_one_line_per_question_with_progress_and_the_closing_tables(demo):
    for question_id in QUESTIONS:
        done = [line for line in demo["train"] if f"question {question_id} succeeded: MAP@3 final" in line]
        assert len(done) == 1 and re.search(r"\[\d/4 models, [\d:]+ elapsed, about [\d:]+ left\]$", done[0]), done
    header = demo["train"].index(next(line for line in demo["train"] if line.startswith("question  rows")))
    summary = read_json(os.path.join(demo["output_dir"], "summary", "all_questions_summary.json"))
    sources = summary["sources"]["best_map3"]["questions"]
    for line, question_id in zip(demo["train"][header + 1:], QUESTIONS):
        entry = summary["per_question"][str(question_id)]
        assert line.split()[:8] == [str(question_id), "150", str(entry["num_classes"]), f"{entry['best_map3']:.4f}",
                                    f"{entry['final_map3']:.4f}", f"{entry['prior_map3']:.4f}", f"{entry['seconds']:.1f}",
                                    "stalled" if entry["stalled"] else "succeeded"]
        assert line.endswith(report.source_text(sources[str(question_id)]))
    # The default recipe: a global model, then the question models started from it.
    assert demo["train"][header + 3].startswith("global model succeeded: MAP@3 ")
    assert demo["train"][header + 4].startswith("submit.py's sources (best_map3, 300 rows): MAP@3 ")
    assert demo["train"][header + 5].startswith(f"overall (row-weighted, 300 validation rows): MAP@3 {summary['overall_final_map3']:.4f} "
                                                f"(final checkpoint; best_map3 {summary['overall_best_map3']:.4f}, selected on these same rows)")
    predicted = [line.split() for line in demo["submit"] if re.match(r"\s*\d+\s+\d+\s+\S", line)]
    test_ids = set(pd.read_csv(os.path.join(demo["output_dir"], "inputs", "test.csv"))["QuestionId"])
    assert [int(row[0]) for row in predicted] == sorted(test_ids)
    expected = {0.0: "model (2 folds)", 1.0: "global model (2 folds)"}
    for row in predicted:
        if int(row[0]) in QUESTIONS:
            weight = sources[row[0]]["global_weight"]
            assert " ".join(row[2:-1]) == expected.get(weight, f"model (2 folds) + global model (2 folds), global weight {weight:g}")


def test_pictures_have_one_panel_per_trained_question_and_a_line_per_fold(demo, tmp_path):
    config.update({"OUTPUT_DIR": demo["output_dir"]})
    summary_dir = os.path.join(demo["output_dir"], "summary")
    for name in ("map3_by_question.png", "learning_curves.png"):
        with open(os.path.join(summary_dir, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    results = read_question_results(QUESTIONS)
    summary = read_json(os.path.join(summary_dir, "all_questions_summary.json"))
    bars = report.plot_map3_by_question(results, summary, str(tmp_path / "check.png"))
    ordered = sorted(QUESTIONS, key=lambda q: results[q]["final_map3"])
    assert [label.get_text() for label in bars.axes[0].get_yticklabels()] == [str(q) for q in ordered]
    assert [text.get_text() for text in bars.axes[0].texts][:2] == [f"{results[q]['final_map3']:.3f}" for q in ordered]
    curves = report.plot_learning_curves(results, str(tmp_path / "check.png"))
    panels = [axis for axis in curves.axes if axis.get_title()]
    assert sorted(axis.get_title().split(":")[0] for axis in panels) == sorted(map(str, QUESTIONS))
    for axis in panels:
        folds = [line for line in axis.get_lines() if line.get_linestyle() == "-" and line.get_marker() == "None"]
        assert len(folds) == 2 and all(len(line.get_xdata()) > 1 for line in folds)


def test_summary_json_keeps_its_keys_and_adds_the_prior(demo):
    summary = read_json(os.path.join(demo["output_dir"], "summary", "all_questions_summary.json"))
    assert {"questions", "succeeded", "failed", "skipped", "missing", "per_question", "overall_best_map3",
            "overall_final_map3", "val_rows", "seconds"} <= set(summary)
    assert 0 < summary["overall_prior_map3"] < summary["overall_best_map3"]
    question = json.load(open(os.path.join(demo["output_dir"], "summary", f"question_{QUESTIONS[0]}_results.json")))
    assert 0 < question["prior_map3"] < 1


def test_a_global_only_run_closes_with_the_global_line_alone():
    """Without question models the per-question overall (0 rows, every question 'missing') would only mislead."""
    summary = {"per_question": {}, "missing": [31772, 31774], "val_rows": 0, "overall_final_map3": None,
               "overall_best_map3": None, "overall_prior_map3": None, "succeeded": 0, "failed": 0, "skipped": 0,
               "seconds": 0, "global": {"status": "succeeded", "final_map3": 0.91, "best_map3": 0.915, "val_rows": 500,
                                        "seconds": 60, "per_question_final_map3": {"31772": 0.93, "31774": 0.85}}}
    lines = report.training_table(summary).splitlines()
    assert lines[-1].startswith("global model succeeded: MAP@3 0.9100") and "500 validation rows" in lines[-1]
    assert not any(line.startswith("overall") for line in lines)
    assert [line.split()[-3:] for line in lines if line.lstrip().startswith(("31772", "31774"))] == [["global", "model", "-"]] * 2
    summary["per_question"] = {"31772": {"status": "succeeded", "rows": 10, "num_classes": 3, "best_map3": 0.9,
                                         "final_map3": 0.9, "prior_map3": 0.8, "seconds": 1.0}}
    summary.update(missing=[31774], val_rows=2, succeeded=1, overall_final_map3=0.9, overall_best_map3=0.9)
    assert report.training_table(summary).splitlines()[-1].startswith("overall (row-weighted, 2 validation rows): MAP@3 0.9000")


def test_without_bars_a_long_model_logs_its_steps_once_a_minute(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(report.time, "time", lambda: clock[0])
    progress = report.RunProgress(1, bars=False)
    steps = report.StepBar(progress)
    state = types.SimpleNamespace(global_step=0, max_steps=100, log_history=[])
    steps.on_train_begin(None, state, None)
    with caplog.at_level("INFO", logger=report.log.name):
        for step in range(1, 101):  # 1.5 s a step: a line at steps 40, 80 (not at the last step)
            clock[0] += 1.5
            state.global_step = step
            if step % 10 == 0:
                state.log_history.append({"loss": 1.0 / step, "step": step})
            steps.on_step_end(None, state, None)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["step 40/100, training loss 0.0250, 01:00 elapsed, about 01:30 left",
                     "step 80/100, training loss 0.0125, 02:00 elapsed, about 00:30 left"]


def test_lines_name_the_global_model_as_such():
    succeeded = {"status": "succeeded", "final_map3": 0.91, "best_map3": 0.92, "prior_map3": 0.6, "seconds": 5.0}
    assert report.question_line({"question_id": config.GLOBAL, **succeeded}) == (
        "global model succeeded: MAP@3 final 0.9100 (best_map3 0.9200), label prior 0.6000; 5.0 s")
    assert report.question_line({"question_id": 31772, **succeeded}).startswith("question 31772 succeeded: ")
    failed = {"status": "failed", "error": "ValueError: bad"}
    assert report.question_line({"question_id": config.GLOBAL, **failed}) == (
        "global model failed: ValueError: bad (traceback in global/logs/train.log)")
    assert report.question_line({"question_id": 33471, **failed}) == (
        "question 33471 failed: ValueError: bad (traceback in question_33471/logs/train.log)")
