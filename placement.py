"""Where models train: the devices of a run (GPUs asked for, else the CPU, --workers times), worker processes that
take models from a shared queue, one GPU pinned to each, and the questions of one machine under --shard K/N.

It runs the training it is handed (train.train_queued) and never imports train.py; torchrun's processes, which all
train one model together, are ranks.py's.
"""
import multiprocessing
import os
import queue

import torch

import config
import report
from utils import InputError, setup_logging, write_json_atomic


def training_devices():
    """Devices to train on: the GPUs asked for (indices among the visible ones, all by default), else the CPU,
    WORKERS times."""
    visible = torch.cuda.device_count()
    gpus = list(range(visible)) if config.GPUS == "all" else [int(g) for g in config.GPUS.split(",") if g]
    unknown = [gpu for gpu in gpus if not 0 <= gpu < visible]
    if unknown:
        raise InputError(f"--gpus {config.GPUS}: GPU {unknown[0]} is not among the {visible} visible GPU(s)")
    devices = [f"cuda:{gpu}" for gpu in gpus] or ["cpu"]
    if config.WORKERS:
        devices = [devices[i % len(devices)] for i in range(config.WORKERS)]
    return devices


def physical_gpu(index):
    """The CUDA_VISIBLE_DEVICES entry for visible GPU `index`, mapped through the list a scheduler may have set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def shard_questions(df, question_ids, shard):
    """The K-th of N partitions of the questions, balanced by row count and the same on every machine."""
    try:
        index, count = (int(part) for part in shard.split("/"))
        assert 1 <= index <= count
    except (ValueError, AssertionError):
        raise InputError(f"--shard {shard}: expected K/N with 1 <= K <= N") from None
    sizes = df["QuestionId"].value_counts()
    loads = [0] * count
    owner = {}
    for question_id in sorted(question_ids, key=lambda q: (-sizes[q], q)):
        target = loads.index(min(loads))
        loads[target] += sizes[question_id]
        owner[question_id] = target + 1
    return [q for q in question_ids if owner[q] == index]


def worker(train, device, threads, settings, question_queue, progress_queue):
    """A worker process: its own device, `train(device, question_ids, progress)` over the shared queue's questions
    until a None."""
    if device.startswith("cuda:"):
        # Before CUDA starts in this process: the worker sees its one GPU only (no DataParallel over the others).
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(int(device.split(":")[1]))
        device = "cuda"
    torch.set_num_threads(threads)
    config.update(settings)
    setup_logging()
    train(device, iter(question_queue.get, None), report.QueuedProgress(progress_queue))


def train_in_workers(train, df, question_ids, devices, progress):
    """One worker process per device running `train` (a module-level function: it is pickled by name); questions
    handed out longest first so the workers finish together.

    The workers report their progress to this process, which logs it. A question a crashed worker left without
    results is recorded as failed.
    """
    context = multiprocessing.get_context("spawn")
    question_queue, progress_queue = context.Queue(), context.Queue()
    sizes = df["QuestionId"].value_counts()
    for question_id in sorted(question_ids, key=lambda q: -sizes.get(q, len(df))):  # GLOBAL: all rows
        question_queue.put(question_id)
    for _ in devices:
        question_queue.put(None)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers = [context.Process(target=worker, args=(train, device, threads, config.snapshot(), question_queue,
                                                    progress_queue))
               for device in devices]
    for process in workers:
        process.start()
    try:
        while any(process.is_alive() for process in workers) or not progress_queue.empty():
            try:
                method, *args = progress_queue.get(timeout=1)
            except queue.Empty:
                continue
            getattr(progress, method)(*args)
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        for process in workers:
            process.terminate()
        for process in workers:
            process.join()
        raise
    crashed = [process.exitcode for process in workers if process.exitcode != 0]
    for question_id in question_ids:
        if crashed and not os.path.isfile(config.get_question_results_path(question_id)):
            write_json_atomic(config.get_question_results_path(question_id), {
                "question_id": question_id, "status": "failed",
                "error": f"worker process exited with code {crashed[0]} before finishing this question"})
