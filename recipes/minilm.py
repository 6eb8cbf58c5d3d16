"""The CPU stand-in's measured best (EXPERIMENTS.md): all-MiniLM-L6-v2 (BERT, 22M), a global model for 4 epochs
at 1e-3, then per-question models started from it for 2 epochs at 5e-4.

    python train.py recipes/minilm.py --model /work/minilm --train-data train.csv --folds 3

bf16 as measured: fast on CPUs with avx512_bf16 or amx_bf16; where the CPU emulates it, a run takes about twice the
time of fp32 (train.py warns; give --precision fp32 there).
"""
LORA_TARGET_MODULES = ["query", "key", "value", "dense"]
MAX_LEN = 128
PRECISION = "bf16"
LABEL_SPACE = "suffix"
STAGES = [
    {"SCOPE": "global", "EPOCHS": 4, "LEARNING_RATE": 1e-3, "EVAL_STEPS": 0.25},
    {"SCOPE": "question", "EPOCHS": 2, "LEARNING_RATE": 5e-4, "EVAL_STEPS": 0.5},
]
