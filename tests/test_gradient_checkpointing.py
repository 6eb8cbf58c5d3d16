"""--gradient-checkpointing trains the same model: the first optimizer steps of one question's training (train.main,
the tiny Qwen3 in fp32) give the same loss and the same LoRA and head gradients with it as without it.

The Trainer turns checkpointing on inside train(), from fine_tune.training_arguments (use_reentrant=False). With
reentrant checkpointing, a layer's LoRA weights get a gradient only if the layer's input requires one, which a
frozen embedding's output does not unless a hook makes it: transformers 4.51 adds no such hook for a peft model."""
import pytest
import torch
import transformers

import fine_tune
from conftest import run_train, train_args

# LoRA's B starts at zero, so A has no gradient until the first update: the second step is the one that tests A
# (no warm-up, whose first step has a learning rate of 0).
STEPS = 2
FLAGS = ["--questions", "33471", "--precision", "fp32", "--warmup-ratio", "0"]
# Measured: the two runs agree bit for bit (largest difference 0 over the losses and every gradient element, fp32 on
# the CPU, transformers 5.24 / peft 0.21 and 4.51 / peft 0.13): the backward pass recomputes each layer with the same
# operations, and the same LoRA dropout masks (checkpointing restores the random state), so nothing is allowed.
EXACT = dict(rtol=0, atol=0)


def first_steps(monkeypatch, model, data, output_dir, *flags):
    """Of the first STEPS optimizer steps: the training loss of each batch, the gradients of the trainable weights
    as the optimizer gets them (clipped; None: no gradient), and how often the first attention layer has run by then."""
    record = {"loss": [], "gradients": [], "attention_calls": []}
    attention_calls = []
    build_loss = fine_tune.training_loss

    def recorded_loss(weights, rows_per_step):
        loss = build_loss(weights, rows_per_step)

        def recording(outputs, labels, num_items_in_batch=None):
            value = loss(outputs, labels, num_items_in_batch)
            record["loss"].append(value.item())
            return value
        return recording

    class FirstSteps(fine_tune.NonFiniteSteps):
        """The run's own NonFiniteSteps, recording the first steps, then stopping training."""

        def on_train_begin(self, args, state, control, **kwargs):
            attention = self.trainer.model.get_base_model().model.layers[0].self_attn
            attention.register_forward_hook(lambda *_: attention_calls.append(1))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            record["gradients"].append({name: None if parameter.grad is None else parameter.grad.clone()
                                        for name, parameter in self.trainer.model.named_parameters()
                                        if parameter.requires_grad})
            record["attention_calls"].append(len(attention_calls))
            control.should_training_stop = len(record["gradients"]) == STEPS
            return super().on_pre_optimizer_step(args, state, control, **kwargs)

    monkeypatch.setattr(fine_tune, "training_loss", recorded_loss)
    monkeypatch.setattr(fine_tune, "NonFiniteSteps", FirstSteps)
    assert run_train(train_args(model, data, output_dir, *FLAGS, *flags)) == 0
    return record


def assert_same_steps(actual, expected):
    assert len(actual["gradients"]) == len(expected["gradients"]) == STEPS
    torch.testing.assert_close(torch.tensor(actual["loss"]), torch.tensor(expected["loss"]), **EXACT)
    for step, (gradients, expected_gradients) in enumerate(zip(actual["gradients"], expected["gradients"]), 1):
        assert gradients.keys() == expected_gradients.keys()
        for name, gradient in gradients.items():
            assert gradient is not None, f"step {step}: no gradient for {name}"
            torch.testing.assert_close(gradient, expected_gradients[name], **EXACT, msg=f"step {step}: {name}")


@pytest.fixture(scope="module")
def without_checkpointing(tiny_model, train_csv, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return first_steps(monkeypatch, tiny_model, train_csv, tmp_path_factory.mktemp("off"))


def test_checkpointing_leaves_the_loss_and_the_lora_and_head_gradients_unchanged(
        without_checkpointing, tiny_model, train_csv, tmp_path, monkeypatch):
    with_checkpointing = first_steps(monkeypatch, tiny_model, train_csv, tmp_path, "--gradient-checkpointing")
    # Checkpointing ran: each step's backward pass ran the layer's forward again.
    assert without_checkpointing["attention_calls"] == [1, 2]
    assert with_checkpointing["attention_calls"] == [2, 4]
    gradients = without_checkpointing["gradients"][-1]
    assert any("lora_A" in name for name in gradients) and any("lora_B" in name for name in gradients)
    assert any("score" in name for name in gradients)  # the head
    assert all(gradient.abs().max() > 0 for gradient in gradients.values())
    assert_same_steps(with_checkpointing, without_checkpointing)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
def test_reentrant_checkpointing_without_input_gradients_gives_lora_no_gradient(
        without_checkpointing, tiny_model, train_csv, tmp_path, monkeypatch):
    """The pitfall, set up in both library versions: the comparison above fails on it."""
    arguments = fine_tune.training_arguments

    def reentrant(*args):
        training_args = arguments(*args)
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": True}
        if hasattr(training_args, "activation_checkpointing_kwargs"):  # transformers 5 reads this name
            training_args.activation_checkpointing_kwargs = {"use_reentrant": True}
        return training_args

    monkeypatch.setattr(fine_tune, "training_arguments", reentrant)
    # transformers 5 hooks the embedding's output to require gradients whenever it checkpoints; 4.51 does not for peft.
    monkeypatch.setattr(transformers.PreTrainedModel, "enable_input_require_grads", lambda self: None)
    broken = first_steps(monkeypatch, tiny_model, train_csv, tmp_path, "--gradient-checkpointing")
    for gradients in broken["gradients"]:
        assert all((gradient is None) == ("lora_" in name) for name, gradient in gradients.items())
    with pytest.raises(AssertionError):
        assert_same_steps(broken, without_checkpointing)
