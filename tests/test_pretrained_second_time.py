"""A second time r on diffusers' SD3 and Flux transformers (``second_time: true``): the adapters start as
the diffusers model for every r, MeanFlow's JVP goes through diffusers' attention (and Flux's RoPE), LoRA
trains r_embed with the adapters, a flow-matching checkpoint starts such a model unchanged, and
`rfkit export` refuses it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from pretrained_fixtures import FLUX_TINY, SD3_TINY, fit_sd3_lora, write_sd3_shards

from rfkit.callbacks import InitFromCheckpoint
from rfkit.checkpoint import load_checkpoint, read_checkpoint
from rfkit.cli import main
from rfkit.draws import RowDraws
from rfkit.models.pretrained import FluxTransformer, LoRA, SD3Transformer
from rfkit.module import RectifiedFlow
from rfkit.objectives import MeanFlow, Shortcut

B = 3


def sd3(**kw) -> SD3Transformer:
    return SD3Transformer(config=SD3_TINY, latent_size=8, **kw)


def flux(**kw) -> FluxTransformer:
    return FluxTransformer(config=FLUX_TINY, latent_size=8, **kw)


def inputs(seed: int = 0, dtype=torch.float32):
    """x (B, 4, 8, 8), t (B,), cond (text (B, 5, 32), pooled (B, 64)): what both tiny models read."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g)
    cond = {"text": torch.randn(B, 5, 32, generator=g), "pooled": torch.randn(B, 64, generator=g)}
    return x.to(dtype), t.to(dtype), {k: v.to(dtype) for k, v in cond.items()}


def move_r_embed(model, seed: int = 3, std: float = 0.05) -> None:
    """Random output layer for r_embed (zero at init), as training would move it."""
    g = torch.Generator().manual_seed(seed)
    for p in model.r_embed.mlp[-1].parameters():
        p.data = (torch.randn(p.shape, generator=g) * std).to(p)


@pytest.mark.parametrize("make", [sd3, flux], ids=["sd3", "flux"])
@torch.no_grad()
def test_second_time_starts_as_the_diffusers_model_for_every_r(make):
    plain, second = make(), make(second_time=True)
    c = second.transformer.config
    assert second.r_embed.mlp[-1].out_features == c.num_attention_heads * c.attention_head_dim  # temb's width
    x, t, cond = inputs()
    v = plain(x, t, cond)
    for r in (None, torch.zeros(B), torch.rand(B), torch.full((B,), 5.0)):
        assert torch.equal(second(x, t, cond, r), v)  # bit for bit: r_embed adds exact zeros
    with pytest.raises(ValueError, match="built without one: construct it with second_time=True"):
        plain(x, t, cond, torch.rand(B))
    # the embedding reaches temb: once it moves, r changes the output, and None is r = 0
    move_r_embed(second)
    r = torch.rand(B)
    assert (second(x, t, cond, r) - v).abs().max() > 1e-3
    torch.testing.assert_close(second(x, t, cond), second(x, t, cond, torch.zeros(B)), rtol=0, atol=0)
    assert second._r is None  # the call's r is cleared after it
    # a copy (what an EMA or a deepcopy'd module holds) hooks its own r_embed, not the original's
    twin = copy.deepcopy(second)
    move_r_embed(twin, seed=4)
    assert (twin(x, t, cond, r) - second(x, t, cond, r)).abs().max() > 1e-3


@pytest.mark.parametrize("make", [sd3, flux], ids=["sd3", "flux"])
def test_meanflow_target_through_the_adapter_is_v_plus_h_times_the_finite_difference(make):
    """MeanFlow's torch.func.jvp through diffusers' attention processors (and Flux's RoPE), in float64, against
    central differences of the total derivative d/dt u(z_t, t, h = r - t) with r fixed: z moves with v, t by +1,
    h by -1, so du/dt = D_z u v + D_t u - D_h u, each direction differenced on its own. diffusers embeds the
    timestep in float32 (get_timestep_embedding casts it), so D_t u is a Richardson-extrapolated difference
    at eps 3e-4 (1e-3 of the target's scale at best, measured); z and h stay in float64 (eps 1e-6)."""
    model = make(second_time=True)
    move_r_embed(model)
    model = model.double()
    z, t, cond = inputs(1, torch.float64)
    g = torch.Generator().manual_seed(2)
    v, h = torch.randn(z.shape, generator=g, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64) / 2
    t = t / 2
    u, target = MeanFlow().target(model, z, t, h, v, cond)
    torch.testing.assert_close(u, model(z, t, cond, h))
    assert u.requires_grad and not target.requires_grad

    def diff(dz, dt, dh, eps: float) -> torch.Tensor:
        with torch.no_grad():
            plus, minus = (
                model(z + eps * dz, t + eps * dt, cond, h + eps * dh),
                model(z - eps * dz, t - eps * dt, cond, h - eps * dh),
            )
        return (plus - minus) / (2 * eps)

    du_dz, du_dh = diff(v, 0, 0, 1e-6), diff(0, 0, 1, 1e-6)
    du_dt = (4 * diff(0, 1, 0, 1.5e-4) - diff(0, 1, 0, 3e-4)) / 3
    hh = h.view(-1, 1, 1, 1)
    assert (hh * du_dh).abs().max() > 1  # r_embed moved: the h direction is a real part of the derivative
    torch.testing.assert_close(target, v + hh * (du_dz + du_dt - du_dh), rtol=1e-3, atol=1e-2)
    assert (target - (v + hh * (du_dz + du_dt + du_dh))).abs().max() > 1  # the h tangent's sign shows


def base_adapters_r(model) -> tuple[dict, dict, dict]:
    base, adapters = {}, {}
    for name, p in model.transformer.named_parameters():
        (adapters if "lora_" in name else base)[name] = p.detach().clone()
    return base, adapters, {n: p.detach().clone() for n, p in model.r_embed.named_parameters()}


@pytest.mark.parametrize(
    ("make", "objective"),
    [(sd3, MeanFlow(ratio=1.0)), (sd3, Shortcut(fraction=1.0, levels=3)), (flux, MeanFlow(ratio=1.0))],
    ids=["sd3-meanflow", "sd3-shortcut", "flux-meanflow"],
)  # every row an interval h > 0, or a consistency target
def test_lora_trains_r_embed_and_adapters_only(make, objective):
    torch.manual_seed(0)
    model = make(lora=LoRA(), second_time=True)
    flow = RectifiedFlow(model, objective=objective)
    optimizer = flow.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {n for n, _ in model.named_parameters() if "r_embed" in n}
    base0, adapters0, r0 = base_adapters_r(model)
    x, _, cond = inputs(4)
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = flow.velocity_loss({"latent": x, **cond}, RowDraws.from_torch_rng(B))
        loss.mean().backward()
        optimizer.step()
    base, adapters, r = base_adapters_r(model)
    assert all(torch.equal(base[k], base0[k]) for k in base0)  # the base is bit-identical
    assert all(not torch.equal(r[k], r0[k]) for k in r0)  # every r_embed tensor moved
    assert any(not torch.equal(adapters[k], adapters0[k]) for k in adapters0 if "lora_B" in k)
    with torch.no_grad():
        x, t, cond = inputs(5)
        assert (model(x, t, cond, torch.full((B,), 0.5)) - model(x, t, cond)).abs().max() > 1e-4  # r matters now

    # the state dict (checkpoints, EMA) holds the adapters and r_embed, not the base; it loads back exactly
    state = model.state_dict()
    assert {k for k in state if "lora_" not in k} == {"base_sha256_bytes", *(f"r_embed.{k}" for k in r0)}
    rebuilt = make(lora=LoRA(), second_time=True)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        r = torch.rand(B)
        assert torch.equal(rebuilt(x, t, cond, r), model(x, t, cond, r))


def test_bf16_base_keeps_a_float32_r_embed():
    """configs/sd3_lora.yaml loads the base in bf16: r_embed, trainable, stays float32 like the adapters (an update
    lr * grad vanishes in bf16), and its output joins temb in temb's dtype, with and without bf16 autocast."""
    model = sd3(lora=LoRA(), second_time=True, dtype="bfloat16")
    move_r_embed(model)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.r_embed.parameters())
    x, t, cond = inputs(8)
    r = torch.rand(B)
    v = model(x, t, cond, r)  # temb bf16 + r_embed float32 -> bf16, or the blocks' bf16 weights would refuse it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_mixed = model(x, t, cond, r)
    assert v.dtype == v_mixed.dtype == torch.float32  # shaped and typed like x
    with torch.no_grad():
        assert (v - model(x, t, cond)).abs().max() > 1e-2  # r still matters in bf16
    v_mixed.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.r_embed.parameters())


MEANFLOW = [
    "--model.objective=MeanFlow",
    "--model.objective.ratio=1.0",
    "--model.model.init_args.second_time=true",
    "--model.activation_checkpointing=false",  # MeanFlow's JVP refuses it (the config turns it on)
]


def test_meanflow_lora_fit_from_a_flow_matching_checkpoint_samples_resumes_and_refuses_export(tmp_path):
    data = write_sd3_shards(tmp_path / "data", n=8)
    fit_sd3_lora(tmp_path / "fm", data, 2)  # a flow-matching LoRA run
    fm_ckpt = tmp_path / "fm/checkpoints/last.ckpt"
    teacher = load_checkpoint(fm_ckpt).model

    # InitFromCheckpoint into a second-time LoRA model: its r_embed keeps its zero init, so the velocity is the
    # checkpoint's for every r (how rfkit fit calls it: a fresh run at step 0)
    student = sd3(lora=LoRA(), second_time=True)
    InitFromCheckpoint(str(fm_ckpt)).on_fit_start(
        SimpleNamespace(ckpt_path=None, global_step=0), SimpleNamespace(model=student)
    )
    x, t, cond = inputs(6)
    with torch.no_grad():
        v = teacher(x, t, cond)
        assert (v - sd3()(x, t, cond)).abs().max() > 1e-5  # the teacher's adapters moved: the check means something
        for r in (None, torch.rand(B)):
            assert torch.equal(student(x, t, cond, r), v)
    # a fully fine-tuned second-time student starts from the adapters merged into the base, r_embed at zero
    full = sd3(second_time=True)
    InitFromCheckpoint(str(fm_ckpt)).on_fit_start(
        SimpleNamespace(ckpt_path=None, global_step=0), SimpleNamespace(model=full)
    )
    with torch.no_grad():
        torch.testing.assert_close(full(x, t, cond, torch.rand(B)), v, rtol=1e-5, atol=1e-5)  # merging rounds

    # MeanFlow through rfkit fit, started from the flow-matching checkpoint, with an EMA
    ema = ["--trainer.callbacks+=rfkit.ema.EMA", "--trainer.callbacks.decay=0.5"]
    init = ["--trainer.callbacks+=InitFromCheckpoint", f"--trainer.callbacks.path={fm_ckpt}"]
    fit_sd3_lora(tmp_path / "mf", data, 2, *MEANFLOW, *ema, *init)
    ckpt = tmp_path / "mf/checkpoints/last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]  # as rfkit.ema.EMA writes it: ema/ beside the live
    r_keys = {k for k in saved if k.startswith("model.r_embed.")}
    assert len(r_keys) == 4  # two linear layers
    assert {f"ema/{k}" for k in r_keys} <= set(saved)  # averaged by the EMA
    optimizer = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    num_adapters = sum("lora_" in k for k in saved if not k.startswith("ema/"))
    assert len(optimizer["state"]) == num_adapters + 4  # the optimizer holds r_embed too
    live = read_checkpoint(ckpt)["current_model_state"]
    assert live["model.r_embed.mlp.2.weight"].abs().sum() > 0  # r_embed trained from its zero init

    module = load_checkpoint(ckpt)  # rfkit sample's path: rebuilt from the config, EMA weights
    assert module.model.second_time and torch.equal(
        module.model.r_embed.mlp[2].weight, saved["ema/model.r_embed.mlp.2.weight"]
    )
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        one = module.sample(noise, cond, num_steps=1)
        jump = noise + module.model(noise, torch.zeros(B), cond, torch.ones(B))  # z_1 = z_0 + 1 * u(z_0, 0, h = 1)
    torch.testing.assert_close(one, jump, rtol=1e-5, atol=1e-5)

    # the same command, longer: resumes at step 2 (InitFromCheckpoint skips)
    resumed = fit_sd3_lora(tmp_path / "mf", data, 3, *MEANFLOW, *ema, *init)
    assert resumed.trainer.global_step == 3
    assert not torch.equal(resumed.model.model.r_embed.mlp[2].weight.detach(), live["model.r_embed.mlp.2.weight"])

    with pytest.raises(
        SystemExit, match=r"second time .* no place for it .*`rfkit sample --ckpt` .* rfkit.load_checkpoint"
    ):
        main(["export", f"--ckpt={ckpt}", f"--out={tmp_path / 'export'}"])
    assert not (tmp_path / "export").exists()
