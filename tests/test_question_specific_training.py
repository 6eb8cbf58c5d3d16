"""The detailed end-to-end test: per-question training and inference on a tiny Qwen3 and synthetic data.

Runs under pytest and as a script (`python tests/test_question_specific_training.py`), printing a ✓ line per
step. It uses the real code path: train.main and submit.main with only the data and the model swapped.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

import config  # noqa: E402
import submit  # noqa: E402
import train  # noqa: E402
from demo.synthetic import build_tiny_qwen3, make_synthetic_test, make_synthetic_train  # noqa: E402

QUESTIONS = [31772, 32835, 89443]


def step(message):
    print(f"✓ {message}", flush=True)


def run_end_to_end(workdir):
    model = build_tiny_qwen3(os.path.join(workdir, "tiny_qwen3"))
    train_df = make_synthetic_train(150, seed=3, question_ids=QUESTIONS)
    train_path, test_path = os.path.join(workdir, "train.csv"), os.path.join(workdir, "test.csv")
    train_df.to_csv(train_path, index=False)
    make_synthetic_test(train_df, rows=60).to_csv(test_path, index=False)
    step(f"tiny Qwen3 and {len(train_df)} synthetic rows for questions {QUESTIONS}")

    output_dir = os.path.join(workdir, "out")
    common = ["--model", model, "--output-dir", output_dir, "--questions", ",".join(map(str, QUESTIONS))]
    tiny_model_settings = [f"{config.SETTINGS[name].flag}={value}" for name, value in config.DEMO_SETTINGS.items()]
    code = train.main(common + ["--train-data", train_path, *tiny_model_settings])
    assert code == 0, f"train.py exited with {code}"
    summary = json.load(open(os.path.join(output_dir, "summary", "all_questions_summary.json")))
    assert summary["succeeded"] == len(QUESTIONS), summary
    for question_id in QUESTIONS:
        for name in ("best", "best_map3", "logs", "label_encoder.joblib"):
            assert os.path.exists(os.path.join(output_dir, f"question_{question_id}", name)), (question_id, name)
    assert os.path.isfile(os.path.join(output_dir, "summary", "map3_by_question.png"))
    step(f"trained {len(QUESTIONS)} questions: overall validation MAP@3 {summary['overall_final_map3']:.4f} (final checkpoint; "
         f"best_map3 {summary['overall_best_map3']:.4f}, selected on the same rows)")
    assert summary["overall_best_map3"] > 0.8, summary

    submission_path = os.path.join(workdir, "submission.csv")
    assert submit.main(common + ["--test-data", test_path, "--submission", submission_path]) == 0
    submission = pd.read_csv(submission_path, keep_default_na=False, dtype=str)
    test = pd.read_csv(test_path, keep_default_na=False, dtype=str)
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert all(len(set(labels.split())) == 3 for labels in submission["Category:Misconception"])
    step(f"submission: {len(submission)} rows, 3 distinct labels each, row order kept")
    return summary


def test_question_specific_training(tmp_path):
    saved = config.snapshot()
    try:
        run_end_to_end(str(tmp_path))
    finally:
        config.update(saved)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        run_end_to_end(directory)
    print("all steps passed")
