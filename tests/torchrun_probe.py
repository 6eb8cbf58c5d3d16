"""Run under torchrun by tests/test_ranks.py, with what a test needs to observe or break inside the processes.

    torchrun ... tests/torchrun_probe.py rows OUT.json   each rank's training batches for two epochs, through
                                                         MapTrainer.get_train_dataloader under the Trainer's DDP setup
    torchrun ... tests/torchrun_probe.py die STEP TRAIN_ARGS...   train.py, rank 1 killed at optimizer step STEP
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import report  # noqa: E402
import train  # noqa: E402
from fine_tune import MapTrainer  # noqa: E402

ROWS = 103
BATCH = 4  # per process


def batches_of_each_rank(path):
    """Rows of varied lengths; each rank records the row ids of every batch it gets in two epochs; rank 0 writes
    {rank: [[epoch's batches], ...]}."""
    torch.distributed.init_process_group("gloo")  # as ranks.start does on CPUs
    dataset = [{"input_ids": [1] * (5 + (row * 7) % 23), "labels": row} for row in range(ROWS)]
    trainer = MapTrainer(model=torch.nn.Linear(2, 2),
                         args=TrainingArguments(output_dir=os.path.dirname(path), per_device_train_batch_size=BATCH,
                                                use_cpu=True, report_to="none", seed=3),
                         train_dataset=dataset, data_collator=lambda rows: [row["labels"] for row in rows],
                         data=None, val_idx=None, precision="fp32", best_map3_dir=None)
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([batch for batch in loader])
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, epochs)
    if torch.distributed.get_rank() == 0:
        with open(path, "w") as handle:
            json.dump({"world_size": len(shares), "ranks": shares}, handle)
    torch.distributed.destroy_process_group()


def die_at(step, argv):
    """train.main(argv), with rank 1's process exiting at once (as a killed one would) at optimizer step `step`."""
    original = report.StepBar.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step and os.environ["RANK"] == "1":
            os._exit(9)
        return original(self, args, state, control, **kwargs)
    report.StepBar.on_step_end = on_step_end
    return train.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "rows":
        batches_of_each_rank(sys.argv[2])
    else:
        sys.exit(die_at(int(sys.argv[2]), sys.argv[3:]))
