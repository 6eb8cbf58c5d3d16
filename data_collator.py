"""Dynamic padding: each batch is padded to its own longest row, on the tokenizer's padding side.

transformers' DataCollatorWithPadding does the padding (left or right, attention mask, `label` -> `labels`);
this module only fixes how the project builds it, so training and inference pad the same way.
"""
from transformers import DataCollatorWithPadding


def build_data_collator(tokenizer, pad_to_multiple_of=0):
    """pad_to_multiple_of=0 pads to the longest row; 8 suits tensor cores at some cost in padding."""
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of or None, return_tensors="pt")
