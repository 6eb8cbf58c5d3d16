"""Batches that waste little on padding: dynamic padding, and training batches of rows of similar length.

transformers' DataCollatorWithPadding does the padding (left or right, attention mask, `label` -> `labels`);
this module only fixes how the project builds it, so training and inference pad the same way.
"""
import math

import numpy as np
from transformers import DataCollatorWithPadding


def build_data_collator(tokenizer, pad_to_multiple_of=0):
    """pad_to_multiple_of=0 pads to the longest row; 8 suits tensor cores at some cost in padding."""
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of or None, return_tensors="pt")


class LengthGroupedBatches:
    """A batch sampler for training: each epoch, rows sorted by length over the whole dataset are cut into
    batches, and the order of the batches is shuffled.

    Each batch holds rows of nearly one length (little padding), every row appears once per epoch, and the
    order depends only on the seed and the epoch. Rows of equal length are shuffled before sorting, so
    batches differ between epochs. The Trainer calls `set_epoch` where its accelerate version does; without
    it, each pass over the batches is the next epoch.
    """

    def __init__(self, lengths, batch_size, seed):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)

    def batches(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        shuffled = rng.permutation(len(self.lengths))
        order = shuffled[np.argsort(self.lengths[shuffled], kind="stable")]
        batches = [order[start:start + self.batch_size].tolist() for start in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)
