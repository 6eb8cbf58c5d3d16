"""What a killed run loses: a train.py command run without a stop, and the same command killed part-way and run again.

    python benchmarks/resume.py --work-dir /tmp/resume -- recipes/minilm.py --model /path/to/minilm \
        --train-data train.csv --scope global --questions 31774,33471,109465 --precision fp32

Runs the command after `--` three times, each with its own --output-dir under --work-dir: (1) without a stop,
timed; (2) in a fresh dir, killed with SIGKILL after --kill-at times (1)'s wall time; (3) the same command again in
(2)'s dir, timed. Prints the three times, the step (3) resumed from (its log line), and each model's steps, final
and best MAP@3 in (1) and (3): they match when the resumed model trained as the uninterrupted one did. The last line
is one JSON object with every figure.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(command, output_dir, kill_after=None):
    """(wall seconds, combined output) of train.py with `command` into output_dir; SIGKILLed after kill_after s."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *command, "--output-dir", output_dir],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        output, _ = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
    return time.perf_counter() - started, output


def model_results(output_dir):
    """{results file: its steps, final and best MAP@3} of every trained model in a run."""
    found = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "summary", "*_results.json"))):
        with open(path) as handle:
            result = json.load(handle)
        if result.get("status") == "succeeded":
            steps = result.get("steps", [fold.get("steps") for fold in result.get("fold_results", [])])
            found[os.path.basename(path)] = {"steps": steps, "final_map3": result["final_map3"],
                                             "best_map3": result["best_map3"]}
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, help="the three output dirs go here (emptied first)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill run (2) after this fraction of run (1)'s time")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then train.py's recipe and flags")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    shutil.rmtree(args.work_dir, ignore_errors=True)
    uninterrupted_dir, stopped_dir = os.path.join(args.work_dir, "uninterrupted"), os.path.join(args.work_dir, "stopped")

    full_seconds, output = train(command, uninterrupted_dir)
    print(output[-2000:], flush=True)
    killed_seconds, _ = train(command, stopped_dir, kill_after=args.kill_at * full_seconds)
    rerun_seconds, output = train(command, stopped_dir)
    print(output[-2000:], flush=True)
    resumed = re.findall(r"((?:global model|question \d+)(?: fold \d+)?): resuming from step (\d+) of (\d+)", output)

    figures = {"uninterrupted_seconds": round(full_seconds, 1), "killed_after_seconds": round(killed_seconds, 1),
               "rerun_seconds": round(rerun_seconds, 1), "rerun_share_of_uninterrupted": round(rerun_seconds / full_seconds, 3),
               "resumed": [{"model": model, "step": int(step), "of": int(total)} for model, step, total in resumed],
               "uninterrupted": model_results(uninterrupted_dir), "resumed_run": model_results(stopped_dir)}
    print(f"uninterrupted {full_seconds:.0f} s; killed after {killed_seconds:.0f} s; rerun {rerun_seconds:.0f} s "
          f"({rerun_seconds / full_seconds:.0%} of uninterrupted)")
    for entry in figures["resumed"]:
        print(f"  {entry['model']}: resumed from step {entry['step']} of {entry['of']}")
    for name, result in figures["uninterrupted"].items():
        other = figures["resumed_run"].get(name, {})
        print(f"  {name}: final MAP@3 {result['final_map3']:.4f} uninterrupted, {other.get('final_map3', float('nan')):.4f} "
              f"resumed; best {result['best_map3']:.4f} / {other.get('best_map3', float('nan')):.4f}; steps "
              f"{result['steps']} / {other.get('steps')}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
