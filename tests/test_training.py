from types import SimpleNamespace

import torch

from utils.training import TextConditioning, make_optimizer


class CountingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.embedding = torch.nn.Embedding(600, 8)

    def forward(self, ids):
        self.calls += 1
        return (self.embedding(ids),)


class CharTokenizer:
    model_max_length = 6

    def __call__(self, prompt, truncation, padding, max_length, return_tensors):
        ids = [ord(c) % 600 for c in prompt][:max_length] + [0] * max(0, max_length - len(prompt))
        return SimpleNamespace(input_ids=torch.tensor([ids]))


def test_a_frozen_text_encoder_runs_once_per_prompt_at_start_up():
    encoder = CountingEncoder()
    conditioning = TextConditioning(encoder, CharTokenizer(), {0: "a qwe", 1: "a dog"}, trained=False,
                                    device="cpu", dtype=torch.float32)
    assert encoder.calls == 2
    batch = {"keys": [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]}
    states = conditioning(batch)
    assert encoder.calls == 2 and states.shape == (4, 6, 8)
    expected = encoder(CharTokenizer()("a dog", True, "max_length", 6, "pt").input_ids)[0][0]
    assert torch.equal(states[3], expected) and torch.equal(states[0], states[1])


def test_a_trained_text_encoder_runs_every_step():
    encoder = CountingEncoder()
    conditioning = TextConditioning(encoder, CharTokenizer(), {0: "a qwe"}, trained=True, device="cpu",
                                    dtype=torch.float32)
    conditioning({"keys": [(0, 0, 0)], "input_ids": torch.zeros(1, 6, dtype=torch.long)})
    assert encoder.calls == 1


def test_scale_lr_and_8bit_adam():
    args = SimpleNamespace(scale_lr=True, learning_rate=1e-4, gradient_accumulation_steps=2, train_batch_size=3,
                           use_8bit_adam=True, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                           adam_epsilon=1e-8)
    optimizer = make_optimizer(args, [torch.nn.Parameter(torch.zeros(4))], num_processes=2)
    assert type(optimizer).__name__ == "AdamW8bit" and optimizer.param_groups[0]["lr"] == 1e-4 * 12


def test_adamw_is_the_fused_kernel_on_a_cpu_and_steps_like_the_default():
    args = SimpleNamespace(scale_lr=False, learning_rate=1e-2, use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=1e-2, adam_epsilon=1e-8)
    fused_param, plain_param = (torch.nn.Parameter(torch.linspace(-1, 1, 64)) for _ in range(2))
    fused = make_optimizer(args, [fused_param], num_processes=1)
    plain = torch.optim.AdamW([plain_param], lr=1e-2, weight_decay=1e-2)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for param, optimizer in ((fused_param, fused), (plain_param, plain)):
            param.grad = torch.cos(param.detach() * 3)
            optimizer.step()
    assert torch.allclose(fused_param, plain_param, atol=1e-6)
