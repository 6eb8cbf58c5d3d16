"""Prompts never cut the explanation; the collator pads to the batch's longest row on either side."""
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from data_collator import build_data_collator
from demo.synthetic import qwen_tokenizer_dir
from prompts import PROMPTS, create_prompt_v2, encode_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def rows(explanations, question_id=31772):
    return pd.DataFrame({
        "row_id": [str(i) for i in range(len(explanations))], "QuestionId": question_id,
        "QuestionText": "What fraction of the shape is not shaded?", "MC_Answer": r"\( \frac{1}{3} \)",
        "StudentExplanation": explanations,
    })


def test_v2_has_full_context_and_uses_the_chat_template(tokenizer):
    ids, stats = encode_prompts(rows(["because 3 of 9 is a third"]), tokenizer, "create_prompt_v2", 300)
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\nQuestion: What fraction")
    assert r"Choices: \( \frac{1}{3} \) |" in text and "(correct)" in text and "- WNB:" in text
    assert text.rstrip().endswith("Student's explanation: because 3 of 9 is a third<|im_end|>")
    assert stats["shortened"] == 0


def test_context_is_shortened_and_the_explanation_never_cut(tokenizer):
    long_explanation = " ".join(f"word{i}" for i in range(60))
    df = rows([long_explanation, "short"])
    full_ids, _ = encode_prompts(df, tokenizer, "create_prompt_v2", 10_000)
    budget = len(full_ids[0]) - 5
    ids, stats = encode_prompts(df, tokenizer, "create_prompt_v2", budget)
    assert len(ids[0]) <= budget and long_explanation in tokenizer.decode(ids[0])
    assert ids[1] == full_ids[1]
    assert stats["shortened"] == 1 and stats["over_max_len"] == 0
    tiny, stats = encode_prompts(df, tokenizer, "create_prompt_v2", 8)
    assert long_explanation in tokenizer.decode(tiny[0]) and "short" in tokenizer.decode(tiny[1])
    assert stats["over_max_len"] == 2 and stats["shortened"] == 2


def test_v2_levels_drop_context_in_order():
    row = next(rows(["x"]).itertuples(index=False))
    texts = [create_prompt_v2(row, level) for level in range(create_prompt_v2.levels)]
    assert [len(t) for t in texts] == sorted((len(t) for t in texts), reverse=True)
    assert "Question:" in texts[2] and "Question:" not in texts[3]
    assert all("Student's explanation: x" in t for t in texts)


def test_plain_text_without_a_chat_template(tokenizer):
    plain = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    plain.chat_template = None
    ids, _ = encode_prompts(rows(["x"]), plain, "create_prompt_v1", 100)
    assert plain.decode(ids[0]) == "Answer: \\( \\frac{1}{3} \\) (correct)\nExplanation: x"


def test_unknown_question_gets_no_correctness_claim(tokenizer):
    text = PROMPTS["create_prompt_v2"](next(rows(["x"], question_id=1).itertuples(index=False)))
    assert "(correct)" not in text and "Choices" not in text and "Question:" in text


def test_unknown_prompt_version_is_named(tokenizer):
    with pytest.raises(ValueError, match="unknown prompt version 'v9'"):
        encode_prompts(rows(["x"]), tokenizer, "v9", 100)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_to_longest_row(tokenizer, side):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir(), padding_side=side)
    features = [{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4], "labels": 2}]
    batch = build_data_collator(tokenizer)(features)
    pad = tokenizer.pad_token_id
    expected = [[1, 2, 3], [4, pad, pad]] if side == "right" else [[1, 2, 3], [pad, pad, 4]]
    mask = [[1, 1, 1], [1, 0, 0]] if side == "right" else [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].tolist() == expected
    assert batch["attention_mask"].tolist() == mask
    assert batch["labels"].tolist() == [0, 2]
    assert build_data_collator(tokenizer, 8)(features)["input_ids"].shape == torch.Size([2, 8])


def padding_efficiency(batches, lengths):
    return sum(lengths[i] for batch in batches for i in batch) / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_grouped_batches_cover_every_row_once_and_pad_little():
    from data_collator import LengthGroupedBatches
    lengths = np.random.default_rng(0).integers(20, 120, size=517)
    sampler = LengthGroupedBatches(lengths, 32, seed=42)
    epochs = [list(sampler) for _ in range(3)]  # each pass is the next epoch
    assert len(sampler) == 17 and sum(sampler.sizes) == 517
    for batches in epochs:
        assert len(batches) == 17 and sorted(i for batch in batches for i in batch) == list(range(517))
        assert padding_efficiency(batches, lengths) > 0.95  # random batches: about 0.61
        # Sorted across the whole dataset: no two batches overlap in length.
        spans = sorted((min(lengths[batch]), max(lengths[batch])) for batch in batches)
        assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))
    # The batch order is shuffled, differs between epochs, and depends only on seed and epoch.
    assert epochs[0] != epochs[1] and [min(lengths[b]) for b in epochs[0]] != sorted(min(lengths[b]) for b in epochs[0])
    again = LengthGroupedBatches(lengths, 32, seed=42)
    again.set_epoch(1)
    assert list(again) == epochs[1] and list(again) == epochs[2]
    assert list(LengthGroupedBatches(lengths, 32, seed=7)) != epochs[0]


def fewest_tokens_by_search(lengths, n_batches, low, high, token_cap):
    """Every way to cut sorted rows into n_batches consecutive batches of low..high rows: the fewest tokens."""
    if n_batches == 0:
        return 0 if len(lengths) == 0 else float("inf")
    best = float("inf")
    for size in range(low, min(high, len(lengths)) + 1):
        if size * lengths[size - 1] <= token_cap:
            best = min(best, size * lengths[size - 1] + fewest_tokens_by_search(lengths[size:], n_batches - 1, low, high, token_cap))
    return best


def test_padding_batch_sizes_compute_the_fewest_tokens_within_their_bounds():
    from data_collator import padding_batch_sizes
    rng = np.random.default_rng(3)
    for n_rows in (9, 13, 22):
        lengths = np.sort(rng.integers(10, 60, size=n_rows))
        sizes = padding_batch_sizes(lengths, 4)
        assert sum(sizes) == n_rows and len(sizes) == -(-n_rows // 4)  # the steps of an epoch are unchanged
        assert all(1 <= size <= 8 for size in sizes)
        ends = np.cumsum(sizes)
        tokens = [size * lengths[end - 1] for size, end in zip(sizes, ends)]
        assert max(tokens) <= 4 * lengths[-1]  # never more than batch_size rows of the longest length
        assert sum(tokens) == fewest_tokens_by_search(lengths, len(sizes), 1, 8, 4 * lengths[-1])
    # A small question of short prompts with a long tail (104665: 431 training rows): no fixed batching of 32
    # reaches 0.95 (consecutive sorted batches are the best of them); varying sizes do.
    lengths = np.sort(24 + np.random.default_rng(0).geometric(0.08, size=431))
    fixed = [lengths[start:start + 32] for start in range(0, len(lengths), 32)]
    assert sum(map(sum, fixed)) / sum(len(batch) * batch[-1] for batch in fixed) < 0.93
    sizes = padding_batch_sizes(lengths, 32)
    ends = np.cumsum(sizes)
    assert lengths.sum() / sum(size * lengths[end - 1] for size, end in zip(sizes, ends)) > 0.955
    assert len(sizes) == 14 and min(sizes) >= 8 and max(sizes) <= 64


def test_training_dataloader_batches_by_length(tokenizer):
    """fine_tune.MapTrainer.get_train_dataloader: the length-grouped batches, padded by the project's collator."""
    from types import SimpleNamespace

    import fine_tune
    lengths = np.random.default_rng(1).integers(5, 80, size=100)
    dataset = [{"input_ids": [7] * int(length), "labels": i % 3} for i, length in enumerate(lengths)]
    trainer = SimpleNamespace(train_dataset=dataset, data_collator=build_data_collator(tokenizer),
                              args=SimpleNamespace(train_batch_size=8, seed=3, dataloader_num_workers=0, dataloader_pin_memory=False),
                              accelerator=SimpleNamespace(prepare=lambda loader: loader))
    loader = fine_tune.MapTrainer.get_train_dataloader(trainer)
    batches = list(loader)
    assert len(batches) == len(loader) == 13 and sum(len(batch["labels"]) for batch in batches) == 100
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert real == lengths.sum() and real / sum(batch["attention_mask"].numel() for batch in batches) > 0.9


def test_a_chat_template_that_writes_the_bos_token_gets_no_second_one():
    """Llama- and Gemma-style tokenizers add BOS themselves and their chat templates write it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = "Answer : 1 3 ( incorrect ) Explanation a third".split()
    vocab = {"<s>": 0, "<unk>": 1, "<pad>": 2, **{word: i + 3 for i, word in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    bos_adding = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")
    bos_adding.chat_template = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert bos_adding("a third")["input_ids"][0] == 0
    ids, _ = encode_prompts(rows(["a third"]), bos_adding, "create_prompt_v1", 300)
    assert ids[0][0] == 0 and ids[0].count(0) == 1


@pytest.mark.parametrize("template", [None, "{% for message in messages %}[{{ message['content'] | trim }}]{% endfor %}"])
def test_prompts_render_as_apply_chat_template_does(tokenizer, template):
    """One render of the template around a marker gives what rendering every row gives; a template that changes
    the text (here: trims it) is rendered row by row."""
    from prompts import render
    if template:
        tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
        tokenizer.chat_template = template
    texts = ["Answer: 3\nExplanation: a third", "  spaces around  ", "{{ jinja }} {% raw %}", "<|im_end|> x", ""]
    expected = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False) for text in texts]
    assert render(texts, tokenizer) == expected
    assert (expected[1] == "[spaces around]") == bool(template)
