"""Facts about the 15 competition questions: answer choices, the correct answer, known misconceptions.

Derived from the competition's train.csv: the correct answer is the majority MC_Answer among a question's
`True_` rows (Q31778 has a few noisy `True_` rows on a wrong answer); the misconceptions are those labelled
for the question. The one-line explanations are ours, written to give a model context. QuestionText is
not stored here: every row carries it.
"""

CATEGORIES = (
    "True_Correct", "True_Neither", "True_Misconception",
    "False_Correct", "False_Neither", "False_Misconception",
)

questions = {
    31772: {
        "choices": [r"\( \frac{1}{3} \)", r"\( \frac{3}{6} \)", r"\( \frac{3}{8} \)", r"\( \frac{3}{9} \)"],
        "correct_answer": r"\( \frac{1}{3} \)",
        "misconceptions": {
            "Incomplete": "finds the unshaded fraction 3/9 but does not simplify it",
            "WNB": "compares counts of pieces as whole numbers, e.g. unshaded against shaded (3/6)",
        },
    },
    31774: {
        "choices": [r"\( 3 \)", r"\( \frac{1}{12} \)", r"\( \frac{1}{3} \)", r"\( \frac{6}{2} \)"],
        "correct_answer": r"\( \frac{1}{12} \)",
        "misconceptions": {
            "FlipChange": "flips a fraction and changes the operation in the wrong place",
            "Mult": "multiplies by 6 instead of dividing by 6",
            "SwapDividend": "swaps the dividend and the divisor, computing 6 divided by one half",
        },
    },
    31777: {
        "choices": [r"\( 24 \)", r"\( 48 \)", r"\( 60 \)", r"\( 72 \)"],
        "correct_answer": r"\( 72 \)",
        "misconceptions": {
            "Incomplete": "finds one fifth of 120 and stops there",
            "Irrelevant": "uses a step unrelated to the fraction, such as halving 120",
            "Wrong_Fraction": "takes the wrong fraction of the total, such as two fifths",
        },
    },
    31778: {
        "choices": [r"\( 3 \)", r"\( 4 \)", r"\( 6 \)", r"\( 9 \)"],
        "correct_answer": r"\( 6 \)",
        "misconceptions": {
            "Additive": "keeps the difference between numerator and denominator equal instead of the ratio",
            "Irrelevant": "reasons from numbers or steps that do not bear on the proportion",
            "WNB": "treats numerators and denominators as unrelated whole numbers",
        },
    },
    32829: {
        "choices": [r"\( 12 \)", r"\( 22 \)", r"\( 4 \)", r"\( 48 \)"],
        "correct_answer": r"\( 12 \)",
        "misconceptions": {
            "Adding_terms": "subtracts or adds the 2 instead of dividing by it",
            "Inverse_operation": "applies the operation itself rather than its inverse, multiplying by 2",
            "Not_variable": "reads 2y as a two-digit number or ignores that y is a variable",
        },
    },
    32833: {
        "choices": [r"\( 3 \frac{1}{3} \)", r"\( 5 \frac{2}{3} \)", r"\( \frac{10}{15} \)", r"\( \frac{2}{15} \)"],
        "correct_answer": r"\( 3 \frac{1}{3} \)",
        "misconceptions": {
            "Duplication": "multiplies both the numerator and the denominator by 5",
            "Inversion": "multiplies the denominator instead of the numerator",
            "Wrong_Operation": "adds the whole number instead of multiplying",
        },
    },
    32835: {
        "choices": [r"\( 6 \)", r"\( 6.0001 \)", r"\( 6.079 \)", r"\( 6.2 \)"],
        "correct_answer": r"\( 6.2 \)",
        "misconceptions": {
            "Ignores_zeroes": "ignores zeros that hold decimal places",
            "Longer_is_bigger": "thinks a decimal with more digits is larger",
            "Shorter_is_bigger": "thinks a decimal with fewer digits is larger",
            "Whole_numbers_larger": "thinks a whole number is larger than any decimal",
        },
    },
    33471: {
        "choices": [r"\( 15 \)", r"\( 3 \)", r"\( 8 \)", r"\( 9 \)"],
        "correct_answer": r"\( 15 \)",
        "misconceptions": {
            "Incomplete": "finds one eighth of 24 and stops there",
            "Wrong_fraction": "computes the yellow part (3/8) when the green part was asked",
        },
    },
    33472: {
        "choices": [r"\( \frac{11}{15} \)", r"\( \frac{11}{30} \)", r"\( \frac{3}{15} \)", r"\( \frac{3}{8} \)"],
        "correct_answer": r"\( \frac{11}{15} \)",
        "misconceptions": {
            "Adding_across": "adds the numerators together and the denominators together",
            "Denominator-only_change": "makes the denominators common but leaves the numerators unchanged",
            "Incorrect_equivalent_fraction_addition": "makes an error while converting to equivalent fractions",
        },
    },
    33474: {
        "choices": [
            r"\( \frac{1}{3} \times \frac{2}{3} \)",
            r"\( \frac{1}{3}+\frac{2}{3} \)",
            r"\( \frac{2}{3} \div \frac{1}{3} \)",
            r"\( \frac{2}{3}-\frac{1}{3} \)",
        ],
        "correct_answer": r"\( \frac{1}{3} \times \frac{2}{3} \)",
        "misconceptions": {
            "Division": "thinks a fraction of an amount means dividing by that fraction",
            "Subtraction": "thinks eating part of the piece means subtracting the fractions",
        },
    },
    76870: {
        "choices": ["Not enough information", r"\( 10 \)", r"\( 5 \)", r"\( 6 \)"],
        "correct_answer": r"\( 10 \)",
        "misconceptions": {
            "Definition": "misunderstands what makes a polygon regular",
            "Interior": "confuses interior and exterior angles when counting sides",
            "Unknowable": "believes one angle cannot determine the number of sides",
        },
    },
    89443: {
        "choices": [r"\( -13 \)", r"\( -3 \)", r"\( 13 \)", r"\( 3 \)"],
        "correct_answer": r"\( -3 \)",
        "misconceptions": {
            "Positive": "believes the result must be positive when a negative is subtracted",
            "Tacking": "combines the signs by a memorised rule where it does not apply",
        },
    },
    91695: {
        "choices": [r"\( 20 \)", r"\( 22 \)", r"\( 26 \)", r"\( 36 \)"],
        "correct_answer": r"\( 26 \)",
        "misconceptions": {
            "Firstterm": "scales the first term instead of continuing the pattern",
            "Wrong_term": "continues the pattern to the wrong term number",
        },
    },
    104665: {
        "choices": [r"\( 192 \) hours", r"\( 48 \) hours", r"\( 64 \) hours", r"\( 768 \) hours"],
        "correct_answer": r"\( 48 \) hours",
        "misconceptions": {
            "Base_rate": "works from a per-person rate that is set up wrongly",
            "Multiplying_by_4": "multiplies by 4 because there are 4 times as many people",
        },
    },
    109465: {
        "choices": ["Certain", "Impossible", "Likely", "Unlikely"],
        "correct_answer": "Likely",
        "misconceptions": {
            "Certainty": "treats a high probability as certain",
            "Scale": "misplaces the value on the probability scale from impossible to certain",
        },
    },
}


def allowed_labels(question_id):
    """Every `Category:Misconception` label that can occur for a question."""
    misconceptions = questions[question_id]["misconceptions"]
    labels = []
    for category in CATEGORIES:
        if category.endswith("Misconception"):
            labels += [f"{category}:{name}" for name in misconceptions]
        else:
            labels.append(f"{category}:NA")
    return labels


def answer_is_correct(question_id, mc_answer):
    """True/False for a known question, None when the question is unknown (no mask can be applied)."""
    facts = questions.get(question_id)
    if facts is None:
        return None
    return mc_answer.strip() == facts["correct_answer"]
