"""diffusers' SD3 and Flux transformers as rfkit velocity models: the convention bridge against
diffusers' own scheduler loop and training target, the conditioning, and the errors users hit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from pretrained_fixtures import FLUX_POOLED, FLUX_TEXT, FLUX_TINY, SD3_POOLED, SD3_TEXT, SD3_TINY

from rfkit.couplings import Reflow
from rfkit.draws import RowDraws
from rfkit.models.pretrained import FluxTransformer, SD3Transformer
from rfkit.module import RectifiedFlow
from rfkit.sampling import generate
from rfkit.solvers import Euler

B, L = 2, 5


def sd3(**kw) -> SD3Transformer:
    return SD3Transformer(config=SD3_TINY, latent_size=8, **kw)


def flux(**kw) -> FluxTransformer:
    return FluxTransformer(config=FLUX_TINY, latent_size=8, **kw)


def inputs(model, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    text, pooled = (SD3_TEXT, SD3_POOLED) if isinstance(model, SD3Transformer) else (FLUX_TEXT, FLUX_POOLED)
    x = torch.randn(B, *model.latent_shape, generator=g)
    return x, {"text": torch.randn(B, L, text, generator=g), "pooled": torch.randn(B, pooled, generator=g)}


def diffusers_loop(model, noise, cond, steps: int, shift: float) -> torch.Tensor:
    """The pipelines' denoising loop, written against the raw transformer and the scheduler."""
    net = model.transformer
    sigmas = np.linspace(1.0, 1 / steps, steps)  # the Flux pipeline's grid; SD3's pipeline takes sigmas= too
    if isinstance(model, SD3Transformer):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=sigmas)
        latents = noise
        for t in scheduler.timesteps:
            pred = net(
                hidden_states=latents,
                timestep=t.expand(B),
                encoder_hidden_states=cond["text"],
                pooled_projections=cond["pooled"],
                return_dict=False,
            )[0]
            latents = scheduler.step(pred, t, latents).prev_sample
        return latents
    # Flux: resolution-dependent shift a = exp(mu) on packed latents, timestep / 1000 into the model
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=sigmas, mu=math.log(shift))
    c, h, w = noise.shape[1:]
    latents = FluxPipeline._pack_latents(noise, B, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, noise.device, noise.dtype)
    txt_ids = torch.zeros(L, 3)
    guidance = torch.full([1], model.guidance).expand(B)
    for t in scheduler.timesteps:
        pred = net(
            hidden_states=latents,
            timestep=t.expand(B) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["text"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        latents = scheduler.step(pred, t, latents).prev_sample
    return FluxPipeline._unpack_latents(latents, h, w, vae_scale_factor=1)


@pytest.mark.parametrize("make", [sd3, flux], ids=["sd3", "flux"])
@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (6, 3.0)])
@torch.no_grad()
def test_euler_sampling_is_diffusers_scheduler_loop(make, steps, shift):
    model = make().eval()
    noise, cond = inputs(model)
    ours = generate(model, noise, cond, Euler(), num_steps=steps, shift=shift)
    theirs = diffusers_loop(model, noise, cond, steps, shift)
    assert (ours - noise).abs().mean() > 0.1  # the model moved the latents: the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [sd3, flux], ids=["sd3", "flux"])
@torch.no_grad()
def test_training_loss_is_diffusers_training_target(make):
    """train_dreambooth_lora_{sd3,flux}.py: noisy = (1 - sigma) latents + sigma noise, target = noise - latents,
    loss = mean (pred - target)^2; rfkit's velocity loss at t = 1 - sigma is the same number."""
    model = make().eval()
    latents, cond = inputs(model, seed=1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 0.8])
    flow = RectifiedFlow(model, coupling=Reflow())  # Reflow: the noise of the batch is the path's x0
    batch = {"latent": latents, "noise": noise, **cond}
    ours, _ = flow.velocity_loss(batch, RowDraws.from_torch_rng(B), t=1 - sigma)

    s = sigma.view(-1, 1, 1, 1)
    noisy, target = (1 - s) * latents + s * noise, noise - latents
    if isinstance(model, SD3Transformer):
        pred = model.transformer(noisy, cond["text"], cond["pooled"], timestep=sigma * 1000, return_dict=False)[0]
    else:
        h, w = latents.shape[-2:]
        pred = model.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, B, 4, h, w),
            timestep=sigma,  # the Flux script passes timesteps / 1000
            guidance=torch.full((B,), model.guidance),
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["text"],
            txt_ids=torch.zeros(L, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, h, w, vae_scale_factor=1)
    theirs = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_conditioning_null_tokens_and_second_time():
    model, fl = sd3(), flux()
    x, cond = inputs(model)
    null = model.drop_condition(cond, torch.tensor([True, False]))
    assert null["text"][0].abs().sum() == 0 and null["pooled"][0].abs().sum() == 0  # the null is zeros
    assert torch.equal(null["text"][1], cond["text"][1]) and torch.equal(null["pooled"][1], cond["pooled"][1])
    assert model.num_tokens((4, 32, 48)) == 32 * 48  # patch size 1
    assert fl.num_tokens((4, 32, 48)) == 16 * 24  # 2x2 packing
    with pytest.raises(ValueError, match="built without one: construct it with second_time=True"):
        model(x, torch.rand(B), cond, r=torch.rand(B))
    with pytest.raises(ValueError, match=r"lacks \['pooled'\]"):
        model(x, torch.rand(B), {"text": cond["text"]})


def test_flux_odd_latents_are_refused_with_the_reason():
    fl = flux()
    _, cond = inputs(fl)
    with pytest.raises(ValueError, match="7x8 has an odd side: Flux packs 2x2 latent patches"):
        fl(torch.randn(B, 4, 7, 8), torch.rand(B), cond)
    with pytest.raises(ValueError, match="latent_size 9 is odd"):
        FluxTransformer(config=FLUX_TINY, latent_size=9)


def test_folders(tmp_path):
    base = sd3()
    base.transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # a pipeline folder, or its transformer/
        loaded = SD3Transformer(path=str(path), latent_size=8)
        x, cond = inputs(loaded)
        t = torch.rand(B)
        torch.testing.assert_close(loaded(x, t, cond), base(x, t, cond), rtol=0, atol=0)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pipeline folder without a transformer/ subfolder: download"):
        SD3Transformer(path=str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="exactly one of path"):
        SD3Transformer()
