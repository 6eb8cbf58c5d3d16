"""tests/validate_system.py prints a ✓ line per check and exits 1 on any ✗."""
import os
import subprocess
import sys

from utils import EMULATED_BF16, cpu_emulates_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def validate(*args):
    return subprocess.run([sys.executable, "tests/validate_system.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_good_setup_is_all_ticks(tiny_model, train_csv, test_csv, tmp_path):
    run = validate("--model", tiny_model, "--train-data", train_csv, "--test-data", test_csv, "--output-dir", str(tmp_path / "out"))
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout
    assert not [line for line in lines if line.startswith("✗")]
    for name in ("✓ transformers:", "✓ config:", "✓ model:", "✓ lora targets:", "✓ train data:", "✓ test data:",
                 "✓ question ids:", "✓ output dir:", "✓ disk:"):
        assert any(line.startswith(name) for line in lines), name
    assert any(line.startswith("⚠ classes: questions [109465]") for line in lines)
    assert lines[-1] == "all checks passed"
    # The default recipe's two stages, each checked.
    recipe = next(line for line in lines if line.startswith("✓ recipe: "))
    assert recipe.startswith(f"✓ recipe: {os.path.join(ROOT, 'recipes', 'qwen3_0.6b.py')}: --scope global, --epochs 3")
    assert "; then --scope question, --epochs 2" in recipe and f"--init-from {tmp_path / 'out'}" in recipe
    assert sum(line.startswith("✓ config: ") for line in lines) == 2


def test_a_broken_setting_is_a_cross_and_exit_1(tiny_model, train_csv, tmp_path):
    run = validate("--model", tiny_model, "--train-data", train_csv, "--output-dir", str(tmp_path), "--lora-targets", "q_proj,nonexistent",
                   "--precision", "bf16")
    assert run.returncode == 1
    assert "✗ lora targets: not in the model: nonexistent" in run.stdout.splitlines()
    # bf16 on the CPU: a warning where this CPU emulates it, a tick where it computes it natively.
    precision = f"⚠ precision: bf16 (set by --precision) on cpu: {EMULATED_BF16}" if cpu_emulates_bf16() \
        else "✓ precision: bf16 (set by --precision) on cpu"
    assert precision in run.stdout.splitlines()
    run = validate("--model", str(tmp_path / "no_model"), "--train-data", str(tmp_path / "none.csv"), "--output-dir", str(tmp_path))
    assert run.returncode == 1
    crosses = [line for line in run.stdout.splitlines() if line.startswith("✗")]
    assert crosses[0].startswith(f"✗ model: {tmp_path / 'no_model'}: not loadable offline")
    assert crosses[1] == f"✗ train data: {tmp_path / 'none.csv'}: file not found"
    assert run.stdout.splitlines()[-1] == "2 check(s) failed"


def test_init_from_without_a_global_model_is_a_cross(tiny_model, train_csv, tmp_path):
    run = validate("--model", tiny_model, "--train-data", train_csv, "--output-dir", str(tmp_path / "out"),
                   "--init-from", str(tmp_path))
    assert run.returncode == 1
    assert [line for line in run.stdout.splitlines() if line.startswith("✗")] == [
        f"✗ init from: --init-from {tmp_path}: no summary/global_results.json (train it with --scope global)"]


def test_reports_the_precision_for_each_gpu_and_why(fake_gpus, capsys):
    import validate_system
    fake_gpus({"Tesla T4": (7, 5), "NVIDIA H100": (9, 0)})
    validate_system.check_environment(validate_system.Checklist())
    lines = capsys.readouterr().out.splitlines()
    assert "✓ cuda:0: Tesla T4, compute capability 7.5" in lines
    assert "✓ precision: fp16 (native bf16 from compute capability 8.0: no) on cuda:0" in lines
    assert "✓ precision: bf16 (native bf16 from compute capability 8.0: yes) on cuda:1" in lines
