"""Checkpoints inside a model: a model stopped midway (an exception, SIGKILL, a kill during a save) goes on from its
last checkpoint when the same command runs again, as if it had never stopped."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

import fine_tune
import report
from conftest import run_train, train_args
from utils import read_json

QUESTION = 33471
# 33471's 120 training rows in batches of 32 over 8 epochs: 32 steps, evaluated (and checkpointed) every 8; losses
# logged every 4, so each logged loss averages the same steps in a resumed run.
FLAGS = ["--questions", str(QUESTION), "--logging-steps", "4"]
STOP_STEP = 13  # after the checkpoint of step 8, before that of step 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def history(output_dir, name="log_history.json"):
    with open(os.path.join(output_dir, f"question_{QUESTION}", "logs", name)) as handle:
        return json.load(handle)


def result(output_dir):
    return read_json(os.path.join(output_dir, "summary", f"question_{QUESTION}_results.json"))


def adapter(output_dir, checkpoint):
    return load_file(os.path.join(output_dir, f"question_{QUESTION}", checkpoint, "adapter_model.safetensors"))


def assert_same_training(resumed_dir, reference_dir):
    """The same loss at every logged step, the same evaluations, the same results and adapters."""
    def logged(output_dir, key):
        return [(entry["step"], entry[key]) for entry in history(output_dir) if key in entry]

    for key in ("loss", "grad_norm", "eval_map3", "eval_loss"):
        resumed, reference = logged(resumed_dir, key), logged(reference_dir, key)
        assert [step for step, _ in resumed] == [step for step, _ in reference] and reference, key
        np.testing.assert_allclose([value for _, value in resumed], [value for _, value in reference], rtol=1e-5,
                                   err_msg=key)
    first, second = result(resumed_dir), result(reference_dir)
    for key in ("best_map3", "best_step", "final_map3", "initial_map3", "steps"):
        assert first[key] == pytest.approx(second[key], rel=1e-6), key
    for checkpoint in ("best", "best_map3"):
        resumed, reference = adapter(resumed_dir, checkpoint), adapter(reference_dir, checkpoint)
        assert resumed.keys() == reference.keys()
        for name in reference:
            np.testing.assert_allclose(resumed[name].numpy(), reference[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert not os.path.exists(os.path.join(resumed_dir, f"question_{QUESTION}", "trainer"))  # removed once complete


def stopping_at(step, error):
    original = report.StepBar.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise error
        return original(self, args, state, control, **kwargs)
    return on_step_end


@pytest.fixture(scope="module")
def reference(tiny_model, train_csv, tmp_path_factory):
    """The model trained without a stop."""
    output_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    assert run_train(train_args(tiny_model, train_csv, output_dir, *FLAGS)) == 0
    return output_dir


def checkpoints(output_dir, fold=None):
    work_dir = os.path.join(output_dir, f"question_{QUESTION}", *([] if fold is None else [f"fold_{fold}"]), "trainer")
    return sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else []


def test_a_model_stopped_by_an_exception_resumes_as_if_never_stopped(reference, tiny_model, train_csv, tmp_path,
                                                                    monkeypatch, caplog):
    args = train_args(tiny_model, train_csv, tmp_path, *FLAGS)
    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_at(STOP_STEP, RuntimeError("stopped")))
        assert run_train(args) == 1
    assert result(str(tmp_path))["status"] == "failed"
    assert checkpoints(str(tmp_path)) == ["checkpoint-8", "resume-8"]  # only the last is kept
    # What resuming reads, without the tokenizer the Trainer saves with a collator that exposes one.
    saved = os.listdir(os.path.join(tmp_path, f"question_{QUESTION}", "trainer", "checkpoint-8"))
    assert "adapter_model.safetensors" in saved and not [name for name in saved if name.startswith("tokenizer")]
    with caplog.at_level(logging.INFO):
        assert run_train(args) == 0
    assert f"question {QUESTION}: resuming from step 8 of 32" in caplog.text
    assert_same_training(str(tmp_path), str(reference))


def test_the_best_map3_so_far_survives_the_resume(tiny_model, train_csv, tmp_path, monkeypatch):
    """MAP@3 scripted to peak at step 8, the checkpoint's step: a resumed model that forgot its best would take the
    first evaluation after the resume as its best and overwrite best_map3/ with it."""
    steps = {}
    evaluate = fine_tune.MapTrainer.evaluate

    def evaluate_noting_the_step(self, *args, **kwargs):
        steps["now"] = self.state.global_step
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(fine_tune.MapTrainer, "evaluate", evaluate_noting_the_step)
    monkeypatch.setattr(fine_tune, "map_at_k", lambda truth, ranked: 0.9 if steps["now"] == 8 else 0.5 + steps["now"] / 1000)
    uninterrupted, stopped = str(tmp_path / "uninterrupted"), str(tmp_path / "stopped")
    assert run_train(train_args(tiny_model, train_csv, uninterrupted, *FLAGS)) == 0
    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_at(STOP_STEP, RuntimeError("stopped")))
        assert run_train(train_args(tiny_model, train_csv, stopped, *FLAGS)) == 1
    assert run_train(train_args(tiny_model, train_csv, stopped, *FLAGS)) == 0
    assert result(stopped)["best_step"] == result(uninterrupted)["best_step"] == 8
    assert result(stopped)["best_map3"] == 0.9
    best, reference = adapter(stopped, "best_map3"), adapter(uninterrupted, "best_map3")
    for name in reference:
        np.testing.assert_allclose(best[name].numpy(), reference[name].numpy(), rtol=1e-4, atol=1e-6)


def killed_run(output_dir, tiny_model, train_csv, kill):
    """Run train.py in a process that SIGKILLs itself where `kill` (code run in it before training) says."""
    script = "\n".join([
        "import os, signal, sys",
        f"sys.path.insert(0, {ROOT!r})",
        "import report, train, transformers",
        "def die(): os.kill(os.getpid(), signal.SIGKILL)",
        kill,
        f"sys.exit(train.main({train_args(tiny_model, train_csv, output_dir, *FLAGS)!r}))",
    ])
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert completed.returncode == -9, completed.stderr[-3000:]
    assert not os.path.exists(os.path.join(output_dir, "summary", f"question_{QUESTION}_results.json"))


def test_a_model_killed_with_sigkill_resumes_as_if_never_stopped(reference, tiny_model, train_csv, tmp_path, caplog):
    killed_run(str(tmp_path), tiny_model, train_csv, "\n".join([
        "original = report.StepBar.on_step_end",
        "def on_step_end(self, args, state, control, **kwargs):",
        f"    if state.global_step == {STOP_STEP}: die()",
        "    return original(self, args, state, control, **kwargs)",
        "report.StepBar.on_step_end = on_step_end",
    ]))
    assert checkpoints(str(tmp_path)) == ["checkpoint-8", "resume-8"]
    with caplog.at_level(logging.INFO):
        assert run_train(train_args(tiny_model, train_csv, tmp_path, *FLAGS)) == 0
    assert f"question {QUESTION}: resuming from step 8 of 32" in caplog.text
    assert_same_training(str(tmp_path), str(reference))


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_to_resume_from(reference, tiny_model, train_csv,
                                                                                       tmp_path, caplog):
    killed_run(str(tmp_path), tiny_model, train_csv, "\n".join([
        "original = transformers.Trainer._save_optimizer_and_scheduler",
        "def save(self, output_dir):",
        "    if self.state.global_step == 16: die()",
        "    return original(self, output_dir)",
        "transformers.Trainer._save_optimizer_and_scheduler = save",
    ]))
    # The save of step 16 was cut short: its adapter is written, the rest is not.
    assert checkpoints(str(tmp_path)) == ["checkpoint-16", "checkpoint-8", "resume-8"]
    partial = os.path.join(tmp_path, f"question_{QUESTION}", "trainer", "checkpoint-16")
    assert os.path.isfile(os.path.join(partial, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(tmp_path, f"question_{QUESTION}", "trainer", "resume-16"))
    with caplog.at_level(logging.INFO):
        assert run_train(train_args(tiny_model, train_csv, tmp_path, *FLAGS)) == 0
    assert f"question {QUESTION}: resuming from step 8 of 32" in caplog.text
    assert_same_training(str(tmp_path), str(reference))


def test_a_checkpoint_made_with_other_settings_is_not_used(tiny_model, train_csv, tmp_path, monkeypatch, caplog):
    args = train_args(tiny_model, train_csv, tmp_path, *FLAGS)
    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_at(STOP_STEP, RuntimeError("stopped")))
        assert run_train(args) == 1
    assert checkpoints(str(tmp_path)) == ["checkpoint-8", "resume-8"]
    with caplog.at_level(logging.INFO):
        assert run_train(args + ["--lora-dropout", "0.1"]) == 0
    assert "was made with other inputs (--lora-dropout 0.05 -> 0.1), starting over" in caplog.text
    assert "resuming" not in caplog.text
    assert result(str(tmp_path))["steps"] == 32 and checkpoints(str(tmp_path)) == []


def test_checkpoint_every_zero_writes_none(tiny_model, train_csv, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_at(STOP_STEP, RuntimeError("stopped")))
        assert run_train(train_args(tiny_model, train_csv, tmp_path, *FLAGS, "--checkpoint-every", "0")) == 1
    assert checkpoints(str(tmp_path)) == []


def test_a_three_fold_model_stopped_in_its_third_fold_retrains_only_that_fold_from_its_checkpoint(
        tiny_model, train_csv, tmp_path, monkeypatch, caplog):
    args = train_args(tiny_model, train_csv, tmp_path, *FLAGS, "--folds", "3", "--epochs", "4")
    begun = []
    on_train_begin = report.StepBar.on_train_begin

    def noting_each_fold(self, args, state, control, **kwargs):
        begun.append(state.global_step)
        return on_train_begin(self, args, state, control, **kwargs)

    monkeypatch.setattr(report.StepBar, "on_train_begin", noting_each_fold)
    on_step_end = report.StepBar.on_step_end

    def stopping_in_the_third_fold(self, args, state, control, **kwargs):
        if len(begun) == 3 and state.global_step == 7:
            raise KeyboardInterrupt
        return on_step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(report.StepBar, "on_step_end", stopping_in_the_third_fold)
        with pytest.raises(KeyboardInterrupt):
            run_train(args)
    assert checkpoints(str(tmp_path), 2) == ["checkpoint-4", "resume-4"] and checkpoints(str(tmp_path), 0) == []
    with caplog.at_level(logging.INFO):
        assert run_train(args) == 0
    assert begun == [0, 0, 0, 4]  # folds 0 and 1 kept, fold 2 taken up at step 4
    assert f"question {QUESTION} fold 2: resuming from step 4 of 16" in caplog.text
    trained = result(str(tmp_path))
    assert trained["status"] == "succeeded" and [fold["steps"] for fold in trained["fold_results"]] == [16, 16, 16]
