"""The training step's parts without a subprocess: latents from the posterior, per-example noise, the loss with and
without prior preservation for epsilon and v-prediction (through the SD family's training maths), the optimizer and
the lr schedule."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tests.helpers import make_config
from utils.families import Components
from utils.families.stable_diffusion import StableDiffusion
from utils.run.dataset import example_noise
from utils.run.loss import diffusion_loss, latent_posterior, make_lr_scheduler, make_optimizer

SHAPE = (4, 2, 2)


class LinearUNet(torch.nn.Module):
    """prediction = a * noisy + b * conditioning mean: a loss with a known value, and the arguments it got."""

    def __init__(self, a=0.5, b=1.0):
        super().__init__()
        self.a, self.b, self.calls = a, b, []

    def forward(self, noisy, timesteps, encoder_hidden_states):
        self.calls.append((noisy, timesteps, encoder_hidden_states))
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * noisy + self.b * bias)


FAMILY = StableDiffusion()  # its training maths: utils/families/diffusion.py


def objective(scheduler, scaling_factor):
    """The SD family's objective over what it reads of the components: the noise scheduler and the VAE's scaling
    factor."""
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=scaling_factor))
    return FAMILY.objective(Components(vae=vae, denoiser=None, noise_scheduler=scheduler), None)


def uniform(num_timesteps):
    return lambda generator: torch.randint(0, num_timesteps, (), generator=generator)


def batch_of(keys):
    return {"keys": keys}


def expected_terms(prediction_type, keys, mean, std, scaling=0.5, seed=3):
    """The noisy latents and the target written out from DDPM's definitions, not through the scheduler's methods:
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x, abar_t = prod(1 - beta)."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    eps, noise, timesteps = example_noise(seed, keys, SHAPE, uniform(100))
    latents = (mean + std * eps) * scaling
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)  # DDPMScheduler's default linear schedule
    abar = torch.cumprod(1 - betas, 0)[timesteps].view(-1, 1, 1, 1).float()
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return scheduler, noisy, target, timesteps


class ZeroUNet(torch.nn.Module):
    def forward(self, noisy, timesteps, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(noisy))


@pytest.mark.parametrize("prediction_type, expected", [("epsilon", 4.0), ("v_prediction", 0.45 * 4 + 0.55 * 1)])
def test_a_hand_computed_loss(prediction_type, expected, monkeypatch):
    """Two timesteps, beta = 0.1 then 0.5 (abar_1 = 0.9 * 0.5 = 0.45); latent 1, noise 2 everywhere, timestep 1,
    a UNet that predicts 0: the loss is the target squared, 2^2 = 4 for epsilon and
    (sqrt(0.45) 2 - sqrt(0.55) 1)^2 = 0.45 4 + 0.55 - 2 sqrt(0.45 0.55) 2 for v."""
    import utils.run.loss as loss_module

    monkeypatch.setattr(loss_module, "example_noise", lambda seed, keys, shape, draw: (
        torch.zeros(len(keys), *shape), torch.full((len(keys), *shape), 2.0), torch.ones(len(keys), dtype=torch.long)))
    scheduler = DDPMScheduler(num_train_timesteps=2, beta_schedule="linear", beta_start=0.1, beta_end=0.5,
                              prediction_type=prediction_type)
    loss = diffusion_loss(batch_of([(0, 0, 0)]), torch.ones(1, *SHAPE), torch.ones(1, *SHAPE),
                          {"encoder_hidden_states": torch.zeros(1, 3, 5)}, ZeroUNet(), objective(scheduler, 1.0), 0)
    if prediction_type == "v_prediction":
        expected -= 2 * (0.45 * 0.55) ** 0.5 * 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_regresses_the_schedulers_target(prediction_type):
    keys = [(0, 0, 0), (0, 1, 0)]
    mean, std = torch.randn(2, *SHAPE), torch.rand(2, *SHAPE)
    context = torch.randn(2, 3, 5)
    scheduler, noisy, target, timesteps = expected_terms(prediction_type, keys, mean, std)
    unet = LinearUNet()
    loss = diffusion_loss(batch_of(keys), mean, std, {"encoder_hidden_states": context}, unet,
                          objective(scheduler, 0.5), 3)
    prediction = 0.5 * noisy + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    assert torch.allclose(loss, F.mse_loss(prediction, target))
    assert torch.equal(unet.calls[0][1], timesteps) and torch.equal(unet.calls[0][2], context)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prior_preservation_weights_the_class_half_on_its_own(prediction_type):
    keys = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]  # instance rows, then their class rows
    mean, std = torch.randn(4, *SHAPE), torch.rand(4, *SHAPE)
    context = torch.randn(4, 3, 5)
    scheduler, noisy, target, _ = expected_terms(prediction_type, keys, mean, std)
    loss = diffusion_loss(batch_of(keys), mean, std, {"encoder_hidden_states": context}, LinearUNet(),
                          objective(scheduler, 0.5), 3, prior_loss_weight=0.3)
    prediction = 0.5 * noisy + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    expected = F.mse_loss(prediction[:2], target[:2]) + 0.3 * F.mse_loss(prediction[2:], target[2:])
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.mse_loss(prediction, target))  # not the plain mean over all rows


def test_an_unknown_prediction_type_is_named():
    from utils.errors import UserError

    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    with pytest.raises(UserError, match="unknown prediction_type 'sample'"):
        diffusion_loss(batch_of([(0, 0, 0)]), torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE),
                       {"encoder_hidden_states": torch.zeros(1, 3, 5)}, LinearUNet(), objective(scheduler, 1.0), 0)


def test_noise_of_an_example_depends_on_the_seed_and_its_key_alone():
    one = example_noise(5, [(2, 7, 0)], SHAPE, uniform(1000))
    in_a_batch = example_noise(5, [(0, 1, 0), (2, 7, 0), (3, 3, 1)], SHAPE, uniform(1000))
    assert all(torch.equal(a[0], b[1]) for a, b in zip(one, in_a_batch))  # batch make-up does not matter
    other_seed = example_noise(6, [(2, 7, 0)], SHAPE, uniform(1000))
    assert not torch.equal(one[1], other_seed[1])
    assert not torch.equal(in_a_batch[1][0], in_a_batch[1][1])  # examples differ


class FakeVAE:
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        self.encoded = 0

    def encode(self, pixels):
        self.encoded += 1
        mean = pixels.mean(dim=1, keepdim=True).repeat(1, 4, 1, 1)[:, :, :2, :2]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.25)))


class FakeCache:
    def __init__(self):
        self.saved = {}

    def save(self, key, mean, std, time_ids):
        self.saved[key] = (mean, std, time_ids)


def test_the_posterior_reads_cached_rows_encodes_pixel_rows_one_at_a_time_and_caches_them():
    pixels = torch.randn(2, 3, 4, 4)
    batch = {"keys": [(0, 0, 0), (0, 1, 0), (0, 2, 0)], "pixel_rows": [0, 2], "pixel_values": pixels,
             "pixel_cache_keys": ["k0", None], "latent_rows": [1], "latent_mean": torch.ones(1, *SHAPE),
             "latent_std": torch.full((1, *SHAPE), 0.5), "time_ids": torch.arange(18.0).view(3, 6)}
    vae, cache = FakeVAE(), FakeCache()
    mean, std = latent_posterior(batch, vae, torch.float32, cache)
    assert vae.encoded == 2  # one image per encode: the result cannot depend on what else is in the batch
    assert torch.equal(mean[1], torch.ones(SHAPE)) and torch.equal(std[1], torch.full(SHAPE, 0.5))
    assert torch.equal(mean[0], pixels[0].mean(dim=0, keepdim=True).repeat(4, 1, 1)[:, :2, :2])
    assert list(cache.saved) == ["k0"] and torch.equal(cache.saved["k0"][0], mean[0])
    assert torch.equal(cache.saved["k0"][2], batch["time_ids"][0])  # with the row's own size and crop


def test_scale_lr_and_8bit_adam():
    config = make_config(num_processes=2, scale_lr=True, learning_rate=1e-4, gradient_accumulation_steps=2,
                         train_batch_size=3, use_8bit_adam=True)
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(4))])
    assert type(optimizer).__name__ == "AdamW8bit" and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 12)


def test_adamw_is_the_fused_kernel_on_a_cpu_and_steps_like_the_default():
    config = make_config(learning_rate=1e-2, adam_weight_decay=1e-2)
    fused_param, plain_param = (torch.nn.Parameter(torch.linspace(-1, 1, 64)) for _ in range(2))
    fused = make_optimizer(config, [fused_param])
    plain = torch.optim.AdamW([plain_param], lr=1e-2, weight_decay=1e-2)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for param, optimizer in ((fused_param, fused), (plain_param, plain)):
            param.grad = torch.cos(param.detach() * 3)
            optimizer.step()
    assert torch.allclose(fused_param, plain_param, atol=1e-6)


def test_the_lr_schedule_spans_the_configured_steps_on_every_process():
    config = make_config(num_processes=2, max_train_steps=10, lr_scheduler="linear", lr_warmup_steps=2,
                         learning_rate=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_lr_scheduler(config, optimizer)
    rates = []
    for _ in range(config.max_train_steps):  # accelerate steps it once per process for every optimizer step
        for _ in range(config.num_processes):
            optimizer.step()
            scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.0)
