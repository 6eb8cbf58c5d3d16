"""Memory estimates for Qwen3 backbones larger than 0.6B on this project's path: parameters, fp16 weights, the LoRA
adapter with its gradients and AdamW state, and the activations of one training batch with and without
--gradient-checkpointing. README.md's table "Larger backbones" comes from its output.

    python benchmarks/memory.py              # about 1 minute and 4 GB of RAM on 2 CPU threads
    python benchmarks/memory.py --tiny       # the tiny test config only, for the tests

Parameters are counted on the meta device (nothing allocated) from the config.json figures in MODELS.

Activations are measured, on the CPU: a Qwen3ForSequenceClassification with the model's real layer sizes, but one
layer and then two and a 1,000-token vocabulary, in bf16 (a T4's fp16 has the same 2 bytes), LoRA attached by
utils.attach_lora as training attaches it, one forward pass in training mode under autocast.
torch.autograd.graph.saved_tensors_hooks sees every tensor autograd keeps for the backward pass; they are counted
once per storage, the model's own weights left out. Two layers less one is each further layer's share (the first
keeps less: nothing below it needs a gradient). What a model
keeps grows with the tokens alone (the attention runs in an SDPA kernel that keeps no tokens x tokens matrix, as a
T4's memory-efficient kernel does). With checkpointing a layer keeps only its input (tokens x hidden, 2 bytes
each) and the backward pass recomputes one layer's full set at a time.
"""
import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from peft import LoraConfig, TaskType  # noqa: E402
from transformers import Qwen3Config, Qwen3ForSequenceClassification  # noqa: E402

import config  # noqa: E402
from utils import attach_lora  # noqa: E402

torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))

# From each model's config.json on the Hugging Face hub (Qwen/Qwen3-<size>): hidden size, intermediate size, layers,
# attention heads, key-value heads; all five have head_dim 128 and a vocabulary of 151,936.
MODELS = {
    "Qwen3-0.6B": (1024, 3072, 28, 16, 8),
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8),
    "Qwen3-4B": (2560, 9728, 36, 32, 8),
    "Qwen3-8B": (4096, 12288, 36, 32, 8),
    "Qwen3-14B": (5120, 17408, 40, 40, 8),
}
TINY = {"tiny": (64, 128, 2, 4, 2)}  # demo.synthetic.build_tiny_qwen3's sizes
HEAD_DIM, TINY_HEAD_DIM, VOCAB = 128, 16, 151936
MEASURED_BATCH, MEASURED_LENGTH = 2, 32
GIB = 2 ** 30


def qwen3_config(sizes, layers=None, vocab=VOCAB, head_dim=HEAD_DIM):
    hidden, intermediate, all_layers, heads, kv_heads = sizes
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers or all_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, pad_token_id=0, num_labels=2, sliding_window=None)


def parameters(sizes, head_dim):
    """(parameters of the classifier: embedding, layers, final norm, the head left out (a few thousand); those of
    the layers LoRA adapts, which submit.py's --merge-lora copies while it predicts)."""
    with torch.device("meta"):
        model = Qwen3ForSequenceClassification(qwen3_config(sizes, head_dim=head_dim))
    named = dict(model.named_parameters())
    adapted = [name for name in named if name.split(".")[-2] in config.LORA_TARGET_MODULES]
    return (sum(parameter.numel() for name, parameter in named.items() if not name.startswith("score.")),
            sum(named[name].numel() for name in adapted))


def lora_config():
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=config.LORA_RANK, lora_alpha=config.LORA_ALPHA,
                      lora_dropout=config.LORA_DROPOUT, target_modules=config.LORA_TARGET_MODULES)


def saved_for_backward(sizes, layers, head_dim):
    """(bytes autograd keeps for the backward pass of one training forward pass, LoRA parameters) of the model with
    `layers` layers, on MEASURED_BATCH rows of MEASURED_LENGTH tokens."""
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(qwen3_config(sizes, layers, vocab=1000, head_dim=head_dim)).to(torch.bfloat16)
    model = attach_lora(model, lora_config(), num_labels=65)
    model.train()
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    input_ids = torch.randint(1, 1000, (MEASURED_BATCH, MEASURED_LENGTH))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16):
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    lora = sum(parameter.numel() for name, parameter in model.named_parameters() if "lora_" in name)
    return sum(storages.values()), lora


def estimate(sizes, head_dim=HEAD_DIM):
    """Per model: parameters, LoRA parameters, and the bytes kept per token by each layer past the first (without
    checkpointing), by a checkpointed layer, and by the one-layer model (its layer and all outside the layers)."""
    one_layer, lora_one = saved_for_backward(sizes, 1, head_dim)
    two_layers, lora_two = saved_for_backward(sizes, 2, head_dim)
    tokens = MEASURED_BATCH * MEASURED_LENGTH
    total, adapted = parameters(sizes, head_dim)
    return {"parameters": total, "adapted_parameters": adapted, "lora": (lora_two - lora_one) * sizes[2],
            "layer_bytes_per_token": (two_layers - one_layer) / tokens,
            "checkpointed_layer_bytes_per_token": 2 * sizes[0],
            "one_layer_model_bytes_per_token": one_layer / tokens}


def activation_bytes_per_token(figures, layers, checkpointing):
    """Bytes kept for the backward pass per token of a batch. With checkpointing: every layer's input, and one layer's
    full set twice (its recomputation, and the gradients of the backward pass through it)."""
    if checkpointing:
        return (layers * figures["checkpointed_layer_bytes_per_token"] + figures["one_layer_model_bytes_per_token"]
                + figures["layer_bytes_per_token"])
    return figures["one_layer_model_bytes_per_token"] + (layers - 1) * figures["layer_bytes_per_token"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test config only")
    parser.add_argument("--tokens", type=int, default=config.TRAIN_BATCH_SIZE * config.MAX_LEN,
                        help="tokens of a training batch, padding included (default: --batch-size x --max-len)")
    args = parser.parse_args(argv)
    models = TINY if args.tiny else MODELS
    head_dim = TINY_HEAD_DIM if args.tiny else HEAD_DIM
    print(f"LoRA r={config.LORA_RANK} on {','.join(config.LORA_TARGET_MODULES)}; activations of a batch of {args.tokens} "
          f"tokens (GiB per 1,000 tokens); training: fp16 weights + LoRA state (16 bytes a parameter: fp32 weight, "
          f"gradient, AdamW's two moments) + activations\n")
    print("model        params  fp16 GiB  merge copy GiB  LoRA params  LoRA state GiB  activations GiB  "
          "checkpointed GiB  training GiB  checkpointed GiB")
    results = {}
    for name, sizes in models.items():
        figures = results[name] = estimate(sizes, head_dim)
        states = (2 * figures["parameters"] + 16 * figures["lora"]) / GIB
        plain, checkpointed = (activation_bytes_per_token(figures, sizes[2], flag) / GIB for flag in (False, True))
        print(f"{name:<11} {figures['parameters'] / 1e9:6.2f}B  {2 * figures['parameters'] / GIB:8.2f}  "
              f"{2 * figures['adapted_parameters'] / GIB:14.2f}  {figures['lora'] / 1e6:10.1f}M  "
              f"{16 * figures['lora'] / GIB:14.2f}  {args.tokens * plain:6.1f} ({1000 * plain:.2f})  "
              f"{args.tokens * checkpointed:9.1f} ({1000 * checkpointed:.2f})  {states + args.tokens * plain:12.1f}  "
              f"{states + args.tokens * checkpointed:16.1f}")
    return results


if __name__ == "__main__":
    main()
