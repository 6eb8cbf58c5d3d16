"""The metric, top-k decoding, CSV validation and atomic writes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils import InputError, decode_top_k, map_at_k, read_competition_csv, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "row_id,QuestionId,QuestionText,MC_Answer,StudentExplanation,Category,Misconception\n"


def test_map_at_3_hand_computed():
    truth = ["a", "b", "c", "d"]
    predicted = [["a", "x", "y"], ["x", "b", "y"], ["x", "y", "c"], ["x", "y", "z"]]
    assert map_at_k(truth, predicted) == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)


def test_map_at_3_counts_a_repeated_correct_label_once_and_ignores_rank_4():
    assert map_at_k(["a"], [["a", "a", "a"]]) == 1.0
    assert map_at_k(["a"], [["x", "a", "a"]]) == 0.5
    assert map_at_k(["a"], [["x", "y", "z", "a"]]) == 0.0


def test_decode_top_k_orders_by_probability():
    classes = ["False_Neither:NA", "True_Correct:NA", "True_Neither:NA", "False_Misconception:X"]
    probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.2, 0.3]])
    assert decode_top_k(probs, classes, [None, None], mask=True) == [
        ["True_Correct:NA", "True_Neither:NA", "False_Neither:NA"],
        ["False_Neither:NA", "False_Misconception:X", "True_Neither:NA"],
    ]


def test_decode_top_k_mask_puts_labels_matching_correctness_first():
    classes = ["False_Neither:NA", "True_Correct:NA", "True_Neither:NA", "False_Misconception:X"]
    probs = np.array([[0.7, 0.1, 0.05, 0.15], [0.05, 0.8, 0.1, 0.05]])
    decoded = decode_top_k(probs, classes, [True, False], mask=True)
    assert decoded[0] == ["True_Correct:NA", "True_Neither:NA", "False_Neither:NA"]
    assert decoded[1] == ["False_Neither:NA", "False_Misconception:X", "True_Correct:NA"]
    assert decode_top_k(probs, classes, [True, False], mask=False)[0][0] == "False_Neither:NA"


def test_decode_top_k_fills_small_label_spaces_with_distinct_labels():
    decoded = decode_top_k(np.ones((1, 1)), ["True_Correct:NA"], [True], True, ["True_Correct:NA", "A", "B", "C"])
    assert decoded == [["True_Correct:NA", "A", "B"]]


def test_csv_keeps_literal_na_and_builds_target(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "1,31772,Q,A,NA,True_Correct,NA\n2,31772,Q,A,,False_Misconception,WNB\n")
    df = read_competition_csv(str(path), labelled=True)
    assert df["StudentExplanation"].tolist() == ["NA", ""]
    assert df["Category:Misconception"].tolist() == ["True_Correct:NA", "False_Misconception:WNB"]
    assert df["QuestionId"].tolist() == [31772, 31772]


def test_csv_keeps_case_distinct_labels_apart(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "1,31777,Q,A,x,False_Misconception,Wrong_Fraction\n2,33471,Q,A,y,False_Misconception,Wrong_fraction\n")
    assert read_competition_csv(str(path), labelled=True)["Misconception"].nunique() == 2


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "file is empty"),
    ("row_id,QuestionId,QuestionText,MC_Answer\n1,2,q,a\n", "missing column(s) StudentExplanation, Category, Misconception"),
    (HEADER, "no data rows"),
    (HEADER + "1,abc,Q,A,x,True_Correct,NA\n", "column QuestionId has non-integer value 'abc' (row_id 1)"),
    (HEADER + "1,5,Q,A,x,True_Correct,NA\n1,5,Q,A,y,True_Correct,NA\n", "column row_id has duplicate value(s) 1"),
    (HEADER + "1,5,Q,A,x,Maybe_Correct,NA\n", "column Category has unknown value 'Maybe_Correct' (row_id 1)"),
    (HEADER + "1,5,Q,A,x,True_Correct,\n", "column Misconception is empty (row_id 1); use NA for none"),
])
def test_bad_csv_is_a_one_line_error_naming_file_and_column(tmp_path, content, message):
    path = tmp_path / "train.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as error:
        read_competition_csv(str(path), labelled=True)
    assert str(error.value) == f"{path}: {message}"


def test_scripts_report_bad_input_in_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nope.csv"
    for script, flag in (("train.py", "--train-data"), ("submit.py", "--test-data")):
        run = subprocess.run([sys.executable, script, flag, str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2
        assert run.stderr.strip().splitlines()[-1] == f"error: {missing}: file not found"
        assert "Traceback" not in run.stderr


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(str(path), {"a": 1})
    write_json_atomic(str(path), {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert os.listdir(path.parent) == ["x.json"]


def test_precision_follows_compute_capability_of_the_device_in_hand(fake_gpus):
    from utils import resolve_precision
    fake_gpus({"NVIDIA A100": (8, 0), "Tesla T4": (7, 5)})  # the current device is the A100
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("auto", "cuda:1") == "fp16"  # emulated bf16 does not count
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda:0") == "bf16"
    with pytest.raises(InputError, match=r"Tesla T4, compute capability 7\.5 has no native bf16"):
        resolve_precision("bf16", "cuda:1")


def test_bf16_on_a_cpu_that_emulates_it_warns_once(tmp_path, monkeypatch, caplog):
    import utils
    emulating, native = tmp_path / "emulating", tmp_path / "native"
    emulating.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert utils.cpu_emulates_bf16(str(emulating)) and not utils.cpu_emulates_bf16(str(native))
    assert not utils.cpu_emulates_bf16(str(tmp_path / "absent"))  # no /proc/cpuinfo (macOS): unknown, no warning

    def bf16_warnings(emulates):
        monkeypatch.setattr(utils, "cpu_emulates_bf16", lambda: emulates)
        utils.warn_emulated_bf16.cache_clear()
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert [utils.resolve_precision(setting, "cpu") for setting in ("bf16", "bf16", "fp32", "auto")] == \
                ["bf16", "bf16", "fp32", "fp32"]
        return [record.getMessage() for record in caplog.records]
    assert bf16_warnings(True) == [f"--precision bf16: {utils.EMULATED_BF16}"]  # once, though resolved twice
    assert bf16_warnings(False) == []


class Overflowing(torch.nn.Module):
    """Logits that overflow in half precision (as fp16 activations do past 65504), and always NaN if `broken`."""

    def __init__(self, broken=False):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 2})()
        self.scale = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float16))
        self.broken = broken

    def forward(self, input_ids, attention_mask):
        logits = input_ids[:, :1].to(self.scale.dtype) * 1e5 * self.scale / 1e5
        if self.broken:
            logits = logits * float("nan")
        return type("Output", (), {"logits": logits})()


def collate(features):
    from transformers import BatchEncoding
    ids = torch.tensor([feature["input_ids"] for feature in features])
    return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_non_finite_logits_are_recomputed_in_fp32_or_raise(caplog):
    from utils import predict_logits
    model = Overflowing()
    logits = predict_logits(model, [[3], [5]], collate, 2, "fp16")
    np.testing.assert_allclose(logits, [[3, -3], [5, -5]], rtol=1e-3)
    assert "non-finite logits in fp16 for a batch of 2 rows: recomputed in fp32" in caplog.text
    assert model.scale.dtype == torch.float16  # the model is given back as it was
    from utils import NonFiniteLogits
    with pytest.raises(NonFiniteLogits):
        predict_logits(Overflowing(broken=True), [[3]], collate, 1, "fp16")


def test_an_adapter_config_from_a_newer_peft_loads_unless_it_uses_a_newer_feature(tmp_path):
    from peft import LoraConfig
    from utils import read_lora_config
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "feature_of_peft_99": None, "peft_version": "99.0"}))
    assert read_lora_config(str(tmp_path)).r == 4
    path.write_text(json.dumps({**saved, "feature_of_peft_99": True}))
    with pytest.raises(ValueError, match="adapter uses feature_of_peft_99, unknown to peft"):
        read_lora_config(str(tmp_path))
