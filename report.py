"""What a person sees of a run: progress, one line per question, the final tables and the summary pictures.

Progress bars are drawn on a terminal only; with output to a file, or from worker processes, the same facts
come as plain log lines.
"""
import math
import os
import time

import numpy as np
from tqdm import tqdm
from transformers import TrainerCallback

import config
from utils import log, read_json


def seconds_text(seconds):
    return tqdm.format_interval(seconds)


def time_left(elapsed, done, total):
    """The rest of the work at the pace so far, as text."""
    return seconds_text(elapsed / done * (total - done))


def score_text(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# ---------------------------------------------------------------- progress

class RunProgress:
    """Models trained out of the models to train, with elapsed and remaining time.

    With `bars` and a terminal: a bar over the run, and one over each model's steps (StepBar). Otherwise the
    figures are appended to each question's line.
    """

    def __init__(self, total, bars=True):
        self.total = total
        self.done = 0
        self.trained = 0  # models of the current question
        self.started = time.time()
        self.bar = tqdm(total=total, unit="model", desc="training", dynamic_ncols=True, disable=None if bars else True)
        self.bars = not self.bar.disable

    def model_done(self):
        self.trained += 1
        self.advance(1)

    def question_done(self, models, line):
        """Log a question's line; all its `models` count as done, also those a failure left untrained."""
        untrained, self.trained = models - self.trained, 0
        self.finish(untrained, line)

    def advance(self, models):
        self.done += models
        self.bar.update(models)

    def finish(self, untrained, line):
        self.advance(untrained)
        if self.bars:
            log.info(line)
            return
        elapsed = time.time() - self.started
        left = f"about {time_left(elapsed, self.done, self.total)} left" if self.done else "time left unknown"
        log.info("%s [%d/%d models, %s elapsed, %s]", line, self.done, self.total, seconds_text(elapsed), left)

    def close(self):
        self.bar.close()


class QueuedProgress(RunProgress):
    """A worker process's progress: it sends its steps to the main process's RunProgress through a queue."""
    bars = False

    def __init__(self, queue):
        self.queue = queue
        self.trained = 0

    def advance(self, models):
        self.queue.put(("advance", models))

    def finish(self, untrained, line):
        self.queue.put(("finish", untrained, line))


class StepBar(TrainerCallback):
    """One model's progress over its optimizer steps: a bar on a terminal, otherwise a line at most every
    LINE_SECONDS (a long model, such as the global one, would else print nothing between its evaluations). The
    model counts as done when training ends."""
    LINE_SECONDS = 60

    def __init__(self, progress):
        self.progress = progress
        self.bar = None
        self.started = self.last_line = 0.0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed model begins at its checkpoint's step.
        self.first_step = state.global_step
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="steps", leave=False,
                        dynamic_ncols=True, disable=not self.progress.bars)
        self.started = self.last_line = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)
        now = time.time()
        if self.progress.bars or now - self.last_line < self.LINE_SECONDS or state.global_step >= state.max_steps:
            return
        self.last_line = now
        elapsed = now - self.started
        loss = next((entry["loss"] for entry in reversed(state.log_history) if "loss" in entry), None)
        log.info("step %d/%d, training loss %s, %s elapsed, about %s left", state.global_step, state.max_steps,
                 score_text(loss), seconds_text(elapsed),
                 time_left(elapsed, state.global_step - self.first_step, state.max_steps - self.first_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
        self.progress.model_done()


# ---------------------------------------------------------------- lines and tables

def model_name(question_id):
    """How lines name a model: "question 31772", or "global model" for the one over all questions."""
    return "global model" if question_id == config.GLOBAL else f"question {question_id}"


def question_line(result):
    question_id, status = result["question_id"], result["status"]
    if status == "succeeded":
        verdict = "STALLED on the label prior" if result.get("stalled") else "succeeded"
        stall = (f" (lead {result['lead_over_prior']:+.4f} within the noise margin {result['stall_margin']:.4f})"
                 if result.get("stalled") else "")
        return (f"{model_name(question_id)} {verdict}: MAP@3 final {score_text(result['final_map3'])} (best_map3 "
                f"{score_text(result['best_map3'])}), label prior {score_text(result.get('prior_map3'))}{stall}; "
                f"{result.get('seconds', 0):.1f} s" + (f"; refit {refit_text(result['refit'])}" if result.get("refit") else ""))
    if status == "skipped":
        return f"{model_name(question_id)} skipped: {result.get('num_classes', 1)} class"
    log_file = os.path.join(os.path.basename(config.get_question_output_dir(question_id)), "logs", "train.log")
    return f"{model_name(question_id)} failed: {result.get('error')} (traceback in {log_file})"


def refit_text(refit):
    """A model's refit model (--refit) in words: "1.25 epochs (40 steps), 12.0 s", or "failed: <error>"."""
    if refit["status"] != "succeeded":
        return f"failed: {refit['error']}"
    return f"{refit['epochs']:.2f} epochs ({refit['steps']} steps), {refit['seconds']:.1f} s"


def text_table(header, rows, left=()):
    """Rows of strings as aligned columns: the columns named in `left` aligned left, the others right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) if name in left else str(cell).rjust(width)
                               for name, cell, width in zip(header, line, widths)).rstrip()
                     for line in [header, *rows])


def training_table(summary):
    """Per question: rows, classes, MAP@3 (best, final, label prior), seconds, status; then the overall figures."""
    sources = (summary.get("sources") or {}).get(config.CHECKPOINT, {})
    chosen = sources.get("questions", {})
    header = ["question", "rows", "classes", "best MAP@3", "final MAP@3", "label prior", "seconds", "status", "submit uses"]
    rows = [[question_id, entry.get("rows") or "-", entry.get("num_classes") or "-", score_text(entry.get("best_map3")),
             score_text(entry.get("final_map3")), score_text(entry.get("prior_map3")), f"{entry.get('seconds') or 0:.1f}",
             "stalled" if entry.get("stalled") else entry["status"], source_text(chosen.get(str(question_id)))]
            for question_id, entry in summary["per_question"].items()]
    # A question without its own model may be covered by the global model: its final MAP@3 there.
    by_global = (summary.get("global") or {}).get("per_question_final_map3") or {}
    rows += [[question_id, "-", "-", "-", score_text(by_global.get(str(question_id))), "-", "-",
              "global model" if str(question_id) in by_global else "missing", source_text(chosen.get(str(question_id)))]
             for question_id in summary["missing"]]
    lines = [text_table(header, rows, left=["status", "submit uses"])]
    if summary.get("global"):
        entry = summary["global"]
        lines.append(f"global model {'STALLED on the label prior' if entry.get('stalled') else entry['status']}: MAP@3 "
                     f"{score_text(entry.get('final_map3'))} (final checkpoint; best_map3 {score_text(entry.get('best_map3'))}) "
                     f"over {entry.get('val_rows')} validation rows; {seconds_text(entry.get('seconds') or 0)} of training")
    if sources.get("overall"):
        overall = sources["overall"]
        folds = any(entry.get("cross_fold_map3") is not None for entry in chosen.values())
        cross_fold = f"; {overall['cross_fold_map3']:.4f} when each fold's weight is chosen on the other folds" if folds else ""
        lines.append(f"submit.py's sources ({config.CHECKPOINT}, {overall['rows']} rows): MAP@3 {overall['chosen_map3']:.4f} "
                     f"with each question's chosen weight (chosen on these rows{cross_fold}), {overall['fixed_map3']:.4f} "
                     f"at --global-weight {summary['sources']['default_global_weight']:g} for all")
    seeds = (summary.get("seeds") or {}).get(config.CHECKPOINT)
    if seeds:
        difference = seeds["average_minus_seeds"]
        lines.append(f"seeds {', '.join(map(str, summary['seeds']['seeds']))} (the table: seed {summary['seeds']['seeds'][0]}'s "
                     f"run; {config.CHECKPOINT}, {seeds['rows']} rows out of fold, each with its chosen sources): MAP@3 {', '.join(f'{score:.4f}' for score in seeds['seeds_map3'])}; "
                     f"their average {seeds['average_map3']:.4f}, {difference['mean']:+.4f} over the seeds' mean "
                     f"(95% {difference['interval'][0]:+.4f} to {difference['interval'][1]:+.4f}); submit.py averages them")
    lines += [f"question {q} failed: {entry['error']}" for q, entry in summary["per_question"].items() if entry["status"] == "failed"]
    refits = {name: entry["refit"] for name, entry in [("global model", summary.get("global") or {}),
                                                       *((f"question {q}", e) for q, e in summary["per_question"].items())]
              if entry.get("refit")}
    if refits:
        lines.append("refit models (--refit: all rows, no validation, so no MAP@3 of their own; submit.py --predict-with): "
                     + "; ".join(f"{name} {refit_text(refit)}" for name, refit in refits.items()))
    if summary["per_question"] or not summary.get("global"):  # a global-only run has no per-question overall
        lines.append(f"overall (row-weighted, {summary['val_rows']} validation rows): MAP@3 {score_text(summary['overall_final_map3'])} "
                     f"(final checkpoint; best_map3 {score_text(summary['overall_best_map3'])}, selected on these same rows), "
                     f"label prior {score_text(summary.get('overall_prior_map3'))}; "
                     f"{summary['succeeded']} succeeded, {summary['failed']} failed, {summary['skipped']} skipped, "
                     f"{len(summary['missing'])} missing; {seconds_text(summary['seconds'])} of training")
    return "\n".join(lines)


def source_text(entry):
    """What submit.py predicts a question with, as train.py chose it: its model, the global model or their blend."""
    if entry is None:
        return "-"
    weight = entry["global_weight"]
    text = "its model" if weight == 0 else "global model" if weight == 1 else f"blend, global weight {weight:g}"
    return text + (" (own model stalled)" if entry.get("stalled") else "")


def prediction_table(groups, seconds):
    """submit.py's closing table: per question (id, rows, how predicted, seconds), then the total."""
    rows = [[question_id, n_rows, how, f"{spent:.1f}"] for question_id, n_rows, how, spent in sorted(groups)]
    total = sum(group[1] for group in groups)
    return (text_table(["question", "rows", "predicted by", "seconds"], rows, left=["predicted by"])
            + f"\n{total} rows in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} rows/s, model loading included)")


def ensemble_line(record, path):
    """submit.py's line on an ensemble of runs: the weights, where they come from, their out-of-fold scores."""
    runs = ", ".join(record["runs"])
    weights = "/".join(f"{weight:g}" for weight in record["weights"])
    if not record["fitted"]:
        return f"ensemble of {runs}: weights {weights} (--ensemble-weights); {path}"
    own = [question for question, entry in record["questions"].items() if entry["own"]]
    alone = ", ".join(f"{score:.4f}" for score in record["runs_map3"])
    return (f"ensemble of {runs}: weights {weights}" + (f", own weights for {', '.join(own)}" if own else "")
            + f"; out of fold over {record['rows']} rows MAP@3 {record['map3']:.4f} (fitted on these rows; each run "
            f"alone {alone}); {path}")


# ---------------------------------------------------------------- pictures

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_map3_by_question(results, summary, path, global_result=None):
    """Bars of validation MAP@3 per trained question, best at the top, each with its label prior's score
    beside it; the axis starts near the lowest score so that 0.93 and 0.98 look different. A global model marks
    its score on each question's rows (bars of their own when no question has a model). Returns the figure."""
    plt = pyplot()
    from matplotlib.ticker import MultipleLocator

    trained = [r for r in results.values() if r["status"] == "succeeded"]
    global_scores = {}
    if global_result and global_result["status"] == "succeeded":
        global_scores = {int(q): score for q, score in global_result.get("per_question_final_map3", {}).items()}
    if trained:
        bars = [(r["question_id"], r["final_map3"], r["best_map3"], r.get("prior_map3")) for r in trained]
        overall, overall_prior, folds = summary["overall_final_map3"], summary.get("overall_prior_map3"), trained[0].get("folds", 1)
        model_label = "model (final checkpoint)"
    else:  # the global model alone: its score on each question's rows; best_map3 and priors are its overall ones
        bars = [(question_id, score, None, None) for question_id, score in global_scores.items()]
        overall, overall_prior, folds = global_result["final_map3"], global_result.get("prior_map3"), global_result.get("folds", 1)
        model_label, global_scores = "global model (final checkpoint)", {}
    bars.sort(key=lambda bar: bar[1])
    model, best, prior = (np.array([np.nan if bar[i] is None else bar[i] for bar in bars], dtype=float) for i in (1, 2, 3))
    marks = np.array([global_scores.get(bar[0], np.nan) for bar in bars], dtype=float)
    lowest = np.nanmin(np.concatenate([model, best, prior, marks, [np.nan if overall_prior is None else overall_prior]]))
    left = max(0.0, math.floor((lowest - 0.03) * 20) / 20)
    y = np.arange(len(bars))
    has_prior = not np.isnan(prior).all()
    row = 0.2 if has_prior else 0.0  # the model's bar above its prior's, or alone in the middle of its row
    figure, axis = plt.subplots(figsize=(7, 1.6 + 0.38 * len(bars)))
    model_bars = axis.barh(y + row, model, height=0.4 if has_prior else 0.6, color="tab:blue", label=model_label)
    if not np.isnan(best).all():
        axis.scatter(best, y + row, color="black", marker="|", s=120, zorder=3,
                     label="best_map3 (checkpoint selected on these same rows)")
    if not np.isnan(marks).all():
        axis.scatter(marks, y + row, color="tab:orange", edgecolor="black", linewidth=0.5, marker="D", s=22, zorder=4,
                     label="global model on the question's rows")
    # In the middle of the bar, clear of the marks and lines near its end.
    axis.bar_label(model_bars, fmt="%.3f", label_type="center", fontsize=8, color="white")
    if has_prior:
        prior_bars = axis.barh(y - 0.2, prior, height=0.4, color="0.8", label="label prior (labels ranked by training frequency)")
        axis.bar_label(prior_bars, fmt="%.3f", padding=2, fontsize=7, color="0.35",
                       bbox=dict(facecolor="white", edgecolor="none", pad=0.3))
    axis.axvline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"overall {overall:.4f} (final checkpoint, row-weighted)")
    if overall_prior is not None:
        axis.axvline(overall_prior, color="0.4", linestyle=":", linewidth=1, label=f"overall label prior {overall_prior:.4f}")
    stalled = {r["question_id"] for r in trained if r.get("stalled")}
    axis.set_yticks(y, [f"{bar[0]} (stalled)" if bar[0] in stalled else str(bar[0]) for bar in bars])
    for tick in axis.get_yticklabels():
        if tick.get_text().endswith("(stalled)"):
            tick.set_color("tab:red")
    axis.set_xlim(left, 1.0)
    axis.xaxis.set_major_locator(MultipleLocator(0.05 if 1 - left <= 0.3 else 0.1))
    axis.set_ylim(-0.6, len(bars) - 0.4)
    scored = "out-of-fold" if folds > 1 else "validation"
    axis.set_xlabel(f"{scored} MAP@3 (the axis starts at {left:.2f})")
    axis.set_ylabel("QuestionId")
    axis.set_title(f"{scored.capitalize()} MAP@3 by question", pad=44)
    axis.grid(axis="x", alpha=0.3)
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return figure


def evaluations(question_id, result):
    """Per fold (one without --folds): the steps, validation MAP@3 and loss of its evaluations."""
    folds = result.get("folds", 1)
    names = ["log_history.json"] if folds == 1 else [f"log_history_fold_{fold}.json" for fold in range(folds)]
    curves = []
    for name in names:
        path = os.path.join(config.get_question_log_dir(question_id), name)
        entries = [entry for entry in read_json(path) if "eval_map3" in entry] if os.path.isfile(path) else []
        curves.append(([e["step"] for e in entries], [e["eval_map3"] for e in entries], [e["eval_loss"] for e in entries]))
    return curves


def plot_learning_curves(results, path, global_result=None, columns=5):
    """Small multiples, one panel per trained model (the global one first): validation MAP@3 (solid, left axis)
    and loss (dashed, right axis) against the step, one colour per fold, the label prior dotted. Returns the figure."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    trained = [r for r in [global_result, *results.values()] if r and r["status"] == "succeeded"]
    curves = {r["question_id"]: evaluations(r["question_id"], r) for r in trained}
    scores = [score for folds in curves.values() for _, map3, _ in folds for score in map3]
    scores += [r["prior_map3"] for r in trained if r.get("prior_map3") is not None]
    low = math.floor(min(scores, default=0) * 10) / 10
    columns = min(columns, len(trained))
    rows = math.ceil(len(trained) / columns)
    width = max(2.6 * columns, 7.0)  # room for the legend above a single panel (a global model alone)
    figure, axes = plt.subplots(rows, columns, figsize=(width, 1.9 * rows), squeeze=False)
    for axis, result in zip(axes.flat, trained):
        loss_axis = axis.twinx()
        for fold, (steps, map3, loss) in enumerate(curves[result["question_id"]]):
            axis.plot(steps, map3, color=f"C{fold}", linewidth=1.3)
            if map3:
                best = int(np.argmax(map3))
                axis.plot(steps[best], map3[best], "o", color=f"C{fold}", markersize=3.5)
            loss_axis.plot(steps, loss, color=f"C{fold}", linewidth=0.9, linestyle="--", alpha=0.7)
        if result.get("prior_map3") is not None:
            axis.axhline(result["prior_map3"], color="0.4", linestyle=":", linewidth=1)
        axis.set_title(f"{result['question_id']}: final {result['final_map3']:.3f} (best {result['best_map3']:.3f})", fontsize=9)
        axis.set_ylim(low, 1.005)
        axis.tick_params(labelsize=7)
        loss_axis.tick_params(labelsize=7, colors="0.4")
        loss_axis.set_ylim(bottom=0)
    for axis in axes.flat[len(trained):]:
        axis.remove()
    for axis in axes[:, 0]:
        axis.set_ylabel("MAP@3", fontsize=8)
    folds = max((len(folds) for folds in curves.values()), default=1)
    handles = [Line2D([], [], color="0.2", label="validation MAP@3 (left axis)"),
               Line2D([], [], color="0.2", linestyle="--", label="validation loss (right axis)"),
               Line2D([], [], color="0.2", marker="o", markersize=3.5, linestyle="", label="best (saved as best_map3/)"),
               Line2D([], [], color="0.4", linestyle=":", label="label prior MAP@3")]
    if folds > 1:
        handles += [Line2D([], [], color=f"C{fold}", label=f"fold {fold}") for fold in range(folds)]
    per_row = max(2, min(len(handles), int(width / 1.9)))  # legend entries are about 1.9 inches wide
    legend_rows = math.ceil(len(handles) / per_row)
    figure.set_figheight(1.9 * rows + 0.3 + 0.22 * legend_rows)
    figure.legend(handles=handles, loc="upper center", ncol=per_row, fontsize=8, frameon=False)
    figure.supxlabel("training step", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.22 * legend_rows / figure.get_figheight()))
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return figure


def plot_summary(results, summary, global_result=None):
    """summary/map3_by_question.png and summary/learning_curves.png from the question results and the global one."""
    if not any(r and r["status"] == "succeeded" for r in [global_result, *results.values()]):
        return
    plot_map3_by_question(results, summary, os.path.join(config.get_summary_dir(), "map3_by_question.png"), global_result)
    plot_learning_curves(results, os.path.join(config.get_summary_dir(), "learning_curves.png"), global_result)
