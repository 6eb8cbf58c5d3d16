"""Prompt text, by name: `PROMPTS[config.PROMPT_VERSION]`.

A prompt builder takes one row and a context level (0 = all context) and returns plain text. When a prompt
is longer than MAX_LEN tokens, `encode_prompts` retries it at the next, shorter level: the context shrinks,
the student's explanation is never cut.
"""
import numpy as np

from prompt_utils import answer_is_correct, questions


def _correctness(row):
    verdict = answer_is_correct(row.QuestionId, row.MC_Answer)
    if verdict is None:
        return ""
    return " (correct)" if verdict else " (incorrect)"


def create_prompt_v1(row, level=0):
    """Compact: the chosen answer, whether it is correct, and the explanation."""
    return f"Answer: {row.MC_Answer}{_correctness(row)}\nExplanation: {row.StudentExplanation}"


def create_prompt_v2(row, level=0):
    """Full context. Levels drop, in turn: misconception descriptions, the choices, the question text."""
    facts = questions.get(row.QuestionId)
    parts = []
    if level < 3:
        parts.append(f"Question: {row.QuestionText}")
    if facts and level < 2:
        parts.append("Choices: " + " | ".join(facts["choices"]))
    parts.append(f"Student's answer: {row.MC_Answer}{_correctness(row)}")
    if facts:
        if level < 1:
            known = "\n".join(f"- {name}: {text}" for name, text in facts["misconceptions"].items())
        else:
            known = ", ".join(facts["misconceptions"])
        parts.append(f"Known misconceptions:\n{known}" if level < 1 else f"Known misconceptions: {known}")
    parts.append(f"Student's explanation: {row.StudentExplanation}")
    return "\n".join(parts)


def create_prompt_global(row, level=0):
    """v1 led by the QuestionId: one model over all questions must know whose labels apply."""
    return f"Question {row.QuestionId}\n{create_prompt_v1(row)}"


create_prompt_v1.levels = 1
create_prompt_v2.levels = 4
create_prompt_global.levels = 1

PROMPTS = {builder.__name__: builder for builder in (create_prompt_v1, create_prompt_v2, create_prompt_global)}
# The prompt of a --scope global run when --prompt-version is not given.
GLOBAL_PROMPT_VERSION = "create_prompt_global"


def render(texts, tokenizer):
    """Each text wrapped in the tokenizer's chat template when it has one (Qwen3), else kept plain (BERT).

    The template is rendered once, around a marker, and each text put in its place: Jinja costs about as
    much per row as tokenizing. A template that changes the text it wraps (strips it, say) is rendered row
    by row, so the result is always what apply_chat_template gives.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(texts)

    def wrap(text):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)

    marker = "\ue000"  # a private-use character no prompt holds
    head, _, tail = wrap(marker).partition(marker)
    probe = " \n{{ probe }} <|im_end|>\n "
    if wrap(probe) != head + probe + tail:
        return [wrap(text) for text in texts]
    return [head + text + tail for text in texts]


def encode_prompts(df, tokenizer, version, max_len):
    """Token ids of each row's prompt, at the most detailed context level that fits max_len.

    Returns (input_ids per row, stats) with stats = mean/p95/max tokens, rows shortened, rows still over
    max_len (the explanation alone is longer: kept whole).
    """
    if version not in PROMPTS:
        raise ValueError(f"unknown prompt version {version!r}; choose from {', '.join(PROMPTS)}")
    builder = PROMPTS[version]
    rows = list(df.itertuples(index=False))
    input_ids = [None] * len(rows)
    level_used = np.zeros(len(rows), dtype=int)
    pending = list(range(len(rows)))
    for level in range(builder.levels):
        if not pending:
            break
        last = level == builder.levels - 1
        texts = render([builder(rows[i], level) for i in pending], tokenizer)
        still_long = []
        # A chat template already writes the special tokens (a Llama or Gemma template its BOS): none added twice.
        for i, ids in zip(pending, tokenizer(texts, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]):
            if len(ids) <= max_len or last:
                input_ids[i] = ids
                level_used[i] = level
            else:
                still_long.append(i)
        pending = still_long
    lengths = np.array([len(ids) for ids in input_ids]) if rows else np.zeros(1, dtype=int)
    stats = {
        "rows": len(rows),
        "mean_tokens": float(lengths.mean()),
        "p95_tokens": float(np.percentile(lengths, 95)),
        "max_tokens": int(lengths.max()),
        "shortened": int((level_used > 0).sum()),
        "over_max_len": int((lengths > max_len).sum()),
    }
    return input_ids, stats
