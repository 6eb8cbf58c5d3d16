"""The default of `python train.py`: Qwen3-0.6B, a global model over every selected question's rows, then one
model per question started from it (global -> per question, the best mode measured with the CPU stand-in).

Not measured with Qwen3-0.6B here (no GPU has run it in this project). Where the numbers come from: public
solutions of the competition fine-tuned Qwen3 and similar LLMs with LoRA at a learning rate of 2e-4 for 2-3
epochs over all rows; the per-question stage halves the rate and trains 2 epochs, the ratio that worked best
for the stand-in (recipes/minilm.py: 1e-3 then 5e-4). Suffix labels: the True_/False_ prefix comes from the
answer's correctness. LoRA rank, alpha, targets and the prompt are config.py's defaults.
"""
LABEL_SPACE = "suffix"
STAGES = [
    {"SCOPE": "global", "EPOCHS": 3, "LEARNING_RATE": 2e-4, "EVAL_STEPS": 0.25},
    {"SCOPE": "question", "EPOCHS": 2, "LEARNING_RATE": 1e-4, "EVAL_STEPS": 0.5},
]
