"""Worker processes, shards and the merged summary."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import config
import placement
import train
from conftest import train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = "31772,33471,104665,109465"


def artifacts(output_dir):
    return sorted(os.path.relpath(p, output_dir) for p in glob.glob(f"{output_dir}/question_*/**/*", recursive=True)
                  if os.path.isfile(p) and "logs" not in p)


def summary(output_dir):
    with open(os.path.join(output_dir, "summary", "all_questions_summary.json")) as handle:
        return json.load(handle)


def same_summary(a, b):
    assert (a["succeeded"], a["failed"], a["skipped"], a["missing"]) == (b["succeeded"], b["failed"], b["skipped"], b["missing"])
    for question_id, entry in a["per_question"].items():
        other = b["per_question"][question_id]
        assert entry["status"] == other["status"] and entry["val_rows"] == other["val_rows"]
        assert entry["best_map3"] == pytest.approx(other["best_map3"], abs=0.03)


@pytest.fixture(scope="module")
def single(tiny_model, train_csv, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("single")
    saved = config.snapshot()
    assert train.main(train_args(tiny_model, train_csv, output_dir, "--questions", QUESTIONS)) == 0
    config.update(saved)
    return str(output_dir)


def test_two_workers_give_the_same_artifacts_and_summary(single, tiny_model, train_csv, tmp_path):
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", QUESTIONS, "--workers", "2")) == 0
    assert artifacts(str(tmp_path)) == artifacts(single)
    same_summary(summary(str(tmp_path)), summary(single))
    devices = {json.load(open(p))["device"] for p in glob.glob(f"{tmp_path}/summary/question_*_results.json")}
    assert devices == {"cpu"}


def test_shards_cover_every_question_once_and_merge_to_the_single_run(single, tiny_model, train_csv, tmp_path):
    df = train.read_competition_csv(train_csv, labelled=True)
    ids = [int(q) for q in QUESTIONS.split(",")]
    parts = [placement.shard_questions(df, ids, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    for k in (1, 2):
        assert train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", QUESTIONS, "--shard", f"{k}/2")) == 0
    assert summary(str(tmp_path))["missing"] == []
    assert train.main(["--output-dir", str(tmp_path), "--questions", QUESTIONS, "--summarize-only"]) == 0
    same_summary(summary(str(tmp_path)), summary(single))
    assert artifacts(str(tmp_path)) == artifacts(single)


def test_bad_shard_is_a_clear_error(tiny_model, train_csv, tmp_path, capsys):
    assert train.main(train_args(tiny_model, train_csv, tmp_path, "--shard", "3/2")) == 2
    assert capsys.readouterr().err.strip() == "error: --shard 3/2: expected K/N with 1 <= K <= N"


def test_killed_worker_leaves_the_rest_complete_and_the_rerun_trains_only_what_is_missing(tiny_model, train_csv, tmp_path):
    command = [sys.executable, "train.py", *train_args(tiny_model, train_csv, tmp_path, "--questions", QUESTIONS,
                                                       "--workers", "2", "--epochs", "20")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = os.path.join(tmp_path, "summary")
    deadline = time.time() + 240
    victim = None
    while victim is None and time.time() < deadline and process.poll() is None:
        logs = glob.glob(f"{tmp_path}/question_*/logs/train.log")
        workers = [p for p in psutil.Process(process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        if len(logs) >= 2 and len(workers) == 2:
            victim = workers[0]
        time.sleep(0.2)
    assert victim is not None, "workers never started training"
    victim.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output
    statuses = {q: json.load(open(f"{results}/question_{q}_results.json"))["status"] for q in QUESTIONS.split(",")}
    failed = [q for q, status in statuses.items() if status == "failed"]
    assert 1 <= len(failed) < 4, statuses
    assert all(statuses[q] in ("succeeded", "skipped") for q in statuses if q not in failed)
    complete_before = {q: os.path.getmtime(f"{results}/question_{q}_results.json") for q in statuses if q not in failed}

    rerun = subprocess.run([sys.executable, "train.py", *train_args(tiny_model, train_csv, tmp_path, "--questions", QUESTIONS,
                                                                    "--epochs", "20")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for q, mtime in complete_before.items():
        assert os.path.getmtime(f"{results}/question_{q}_results.json") == mtime
    assert all(json.load(open(f"{results}/question_{q}_results.json"))["status"] in ("succeeded", "skipped") for q in statuses)
    assert rerun.stderr.count("results complete, skipping") == len(complete_before)


def test_one_selected_gpu_trains_in_a_worker_pinned_to_it(fake_gpus, tiny_model, train_csv, tmp_path, monkeypatch):
    """In-process, the Trainer would wrap the model in DataParallel over every visible GPU."""
    fake_gpus({"Tesla T4": (7, 5), "Tesla T4 ": (7, 5)})
    calls = []
    monkeypatch.setattr(placement, "train_in_workers",
                        lambda run, df, questions, devices, progress: calls.append(("workers", devices)))
    monkeypatch.setattr(train, "train_questions", lambda df, questions, device, progress: calls.append(("in-process", device)))
    train.main(train_args(tiny_model, train_csv, tmp_path, "--questions", "33471", "--gpus", "1", "--workers", "1"))
    assert calls == [("workers", ["cuda:1"])]


def test_a_worker_pins_the_physical_gpu_behind_its_index(train_csv, monkeypatch):
    """Under a scheduler that set CUDA_VISIBLE_DEVICES=5,6, visible GPU 1 is physical GPU 6."""
    import queue
    import torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    pinned = []
    monkeypatch.setattr(train, "train_questions",
                        lambda df, questions, device, progress: pinned.append((os.environ["CUDA_VISIBLE_DEVICES"], device)))
    questions = queue.Queue()
    questions.put(None)
    placement.worker(train.train_queued, "cuda:1", torch.get_num_threads(), {**config.snapshot(), "TRAIN_DATA_PATH": train_csv},
                     questions, queue.Queue())
    assert pinned == [("6", "cuda")]
    assert placement.physical_gpu(0) == "6"  # inside the worker, its one GPU
