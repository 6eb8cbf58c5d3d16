"""Shared fixtures: a tiny random-init Qwen3 with the real Qwen3 tokenizer, synthetic data, one training run."""
import hashlib
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
from demo.synthetic import build_tiny_qwen3, make_synthetic_test, make_synthetic_train  # noqa: E402

torch.set_num_threads(2)

SINGLE_CLASS_QUESTION = 109465
SINGLETON = (31772, "True_Misconception:WNB")
# The demo's settings, under which the tiny model learns the synthetic signal within seconds.
FAST = [f"{config.SETTINGS[name].flag}={value}" for name, value in config.DEMO_SETTINGS.items()] + ["--eval-steps", "0.25"]


@pytest.fixture(autouse=True)
def fresh_config():
    """Scripts write their overrides into the config module: undo them after each test."""
    saved = config.snapshot()
    yield
    config.update(saved)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_qwen3(str(tmp_path_factory.mktemp("tiny_qwen3")))


@pytest.fixture(scope="session")
def train_csv(tmp_path_factory):
    df = make_synthetic_train(150, seed=0, single_class_question=SINGLE_CLASS_QUESTION, singleton_label=SINGLETON)
    path = tmp_path_factory.mktemp("data") / "train.csv"
    df.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="session")
def test_csv(train_csv, tmp_path_factory):
    import pandas as pd
    train = pd.read_csv(train_csv, keep_default_na=False, dtype=str)
    train["QuestionId"] = train["QuestionId"].astype(int)
    path = tmp_path_factory.mktemp("data") / "test.csv"
    make_synthetic_test(train, rows=90).to_csv(path, index=False)
    return str(path)


# Per-question models only, as the tests of per-question training expect; tests of the default recipe (a global
# model, then per-question models) give DEFAULT_RECIPE.
def train_args(model, data, output_dir, *extra, recipe=config.SEED_RECIPE):
    return [recipe, "--model", model, "--train-data", data, "--output-dir", str(output_dir), *FAST, *extra]


def file_hash(path):
    """The short hash train.py records of a results file: its bytes' SHA-1, computed here independently."""
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()[:16]


def run_train(args):
    """train.main(args), with the config module restored afterwards."""
    import train
    saved = config.snapshot()
    try:
        return train.main(args)
    finally:
        config.update(saved)


@pytest.fixture(scope="session")
def trained(tiny_model, train_csv, tmp_path_factory):
    """One training run over all 15 synthetic questions; returns its output dir and exit code."""
    output_dir = tmp_path_factory.mktemp("run")
    return {"output_dir": str(output_dir), "code": run_train(train_args(tiny_model, train_csv, output_dir))}


# The default recipe's two stages (a global model, then per-question models started from it) over two questions and
# one with a single class, which only the global model covers.
STAGE_QUESTIONS = [31772, 33471, SINGLE_CLASS_QUESTION]
STAGE_FLAGS = ["--questions", ",".join(map(str, STAGE_QUESTIONS)), "--folds", "2", "--epochs", "2"]


@pytest.fixture(scope="session")
def two_stages(tiny_model, train_csv, tmp_path_factory):
    """One invocation of the default recipe over STAGE_QUESTIONS (test_recipes.py, test_refit.py); treat it as
    read-only (copy it to change it)."""
    output_dir = str(tmp_path_factory.mktemp("stages"))
    code = run_train(train_args(tiny_model, train_csv, output_dir, *STAGE_FLAGS, recipe=config.DEFAULT_RECIPE))
    return {"output_dir": output_dir, "code": code}


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus({"Tesla T4": (7, 5), ...}): CUDA queries answer as if those GPUs were visible, current one first.

    is_bf16_supported() says True, as it does on a real T4 (it counts emulation).
    """
    def install(gpus):
        names, capabilities = list(gpus), list(gpus.values())

        def index(device=None):
            if isinstance(device, int):
                return device
            device = torch.device("cuda" if device is None else device)
            return 0 if device.index is None else device.index  # no index: the current device, 0

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[index(device)])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[index(device)])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return install
