"""LoRA on a pretrained (here tiny, random) SD3 through `rfkit fit`: only the adapters train and are
saved, the base stays bit-identical, resuming continues, another base is refused; and `rfkit export`
writes what diffusers loads, with the velocity rfkit's model gives."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

pytest.importorskip("peft")

from pretrained_fixtures import SD3_TINY, fit_sd3_lora, write_sd3_shards

from rfkit.checkpoint import load_checkpoint, read_checkpoint
from rfkit.cli import main
from rfkit.models.pretrained import LoRA, SD3Transformer
from rfkit.models.pretrained.lora import weights_sha256

ALPHA = "--model.model.init_args.lora.alpha=8"  # scale alpha / rank = 2: an export that loses alpha shows


def base_and_adapters(model: SD3Transformer) -> tuple[dict, dict]:
    base, adapters = {}, {}
    for name, p in model.transformer.named_parameters():
        (adapters if "lora_" in name else base)[name.replace(".base_layer", "")] = p.detach().clone()
    return base, adapters


def test_lora_fit_trains_only_adapters_saves_them_alone_and_resumes(tmp_path):
    data = write_sd3_shards(tmp_path / "data")
    ema = ["--trainer.callbacks+=rfkit.ema.EMA", "--trainer.callbacks.decay=0.5"]
    trained = fit_sd3_lora(tmp_path / "run", data, 3, ALPHA, *ema).model.model
    base, adapters = base_and_adapters(trained)
    fresh_model = SD3Transformer(config=SD3_TINY, latent_size=8).transformer  # the base, rebuilt
    fresh = dict(fresh_model.named_parameters())
    assert base.keys() == fresh.keys()
    assert all(torch.equal(base[k], fresh[k]) for k in base)  # bit-identical after 3 AdamW steps
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at 0
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)

    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    saved = ckpt["state_dict"]
    assert {k for k in saved if "lora_" not in k} == {"model.base_sha256_bytes"}  # adapters only, and the base's hash
    averaged = {k.removeprefix("ema/") for k in saved if k.startswith("ema/")}
    assert averaged == {k for k in saved if "lora_" in k and not k.startswith("ema/")}  # the EMA: adapters only
    assert bytes(saved["model.base_sha256_bytes"].tolist()).hex() == trained.base_sha256 == weights_sha256(fresh_model)
    assert len(ckpt["optimizer_states"][0]["state"]) == len(adapters)  # the optimizer holds the adapters only

    module = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")  # what `rfkit sample` does: EMA adapters
    live = read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["current_model_state"]
    for name, value in adapters.items():
        assert torch.equal(live[f"model.transformer.{name}"], value)  # the trained adapters, beside the average
        loaded = dict(module.model.transformer.named_parameters())[name]
        assert torch.equal(loaded, saved[f"ema/model.transformer.{name}"])  # sampling uses the average

    # the same command, longer: resumes from last.ckpt at step 3
    resumed = fit_sd3_lora(tmp_path / "run", data, 5, ALPHA, *ema)
    assert resumed.trainer.global_step == 5
    base2, adapters2 = base_and_adapters(resumed.model.model)
    assert all(torch.equal(base2[k], fresh[k]) for k in base2)
    assert any(not torch.equal(adapters2[k], adapters[k]) for k in adapters)

    # export: the LoRA in the pipelines' format, loaded by diffusers into the base, is rfkit's model
    main(["export", f"--ckpt={tmp_path / 'run/checkpoints/last.ckpt'}", f"--out={tmp_path / 'lora'}"])
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()
    theirs = SD3Transformer(config=SD3_TINY).transformer  # a plain diffusers model: the base
    # what StableDiffusion3Pipeline.load_lora_weights does with the folder (its metadata carries alpha = 8)
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=theirs, metadata=metadata)
    assert_same_velocity(load_checkpoint(tmp_path / "run/checkpoints/last.ckpt").model, theirs)

    with pytest.raises(ValueError, match=r"trained on a base whose weights .* adapters only work on the base"):
        fit_sd3_lora(
            tmp_path / "run", data, 7, ALPHA, "--model.model.init_args.seed=1"
        )  # another random base: refused at resume


def assert_same_velocity(ours: SD3Transformer, theirs) -> None:
    """rfkit's v(x, t) against diffusers' transformer called as its pipeline does: v = -out(x, 1000 (1 - t))."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    text, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        v = ours.eval()(x, t, {"text": text, "pooled": pooled})
        out = theirs.eval()(x, text, pooled, timestep=1000 * (1 - t), return_dict=False)[0]
    torch.testing.assert_close(v, -out, rtol=1e-5, atol=1e-5)


def test_export_full_fine_tune_with_ema(tmp_path):
    """No LoRA, with an EMA: `rfkit export` writes save_pretrained's folder, the EMA weights by default."""
    import json

    from diffusers import SD3Transformer2DModel

    data = write_sd3_shards(tmp_path / "data", n=8)
    ema = ["--trainer.callbacks+=rfkit.ema.EMA", "--trainer.callbacks.decay=0.5"]
    fit_sd3_lora(tmp_path / "run", data, 2, "--model.model.init_args.lora=null", *ema)
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    saved = read_checkpoint(ckpt)  # rfkit.ema.EMA: the average as state_dict, the trained weights beside it
    for flag, weights, key in (("true", "ema", "state_dict"), ("false", "live", "current_model_state")):
        out = tmp_path / f"export_{weights}"
        main(["export", f"--ckpt={ckpt}", f"--out={out}", f"--ema={flag}"])
        assert json.loads((out / "rfkit_export.json").read_text())["weights"] == weights
        theirs = SD3Transformer2DModel.from_pretrained(out)
        for name, value in theirs.state_dict().items():
            assert torch.equal(value, saved[key][f"model.transformer.{name}"]), name
    module = load_checkpoint(ckpt)  # rfkit's model with the EMA weights
    assert_same_velocity(module.model, SD3Transformer2DModel.from_pretrained(tmp_path / "export_ema"))
    with pytest.raises(SystemExit, match="already holds files"):
        main(["export", f"--ckpt={ckpt}", f"--out={tmp_path / 'export_ema'}"])


def test_flux_lora_fit_and_export(tmp_path):
    """configs/sd3_lora.yaml switched to the tiny Flux: trains, and its export loads into diffusers' Flux
    (FluxPipeline's LoRA format) with the velocity of rfkit's model, packing and guidance included."""
    from diffusers import FluxPipeline
    from pretrained_fixtures import FLUX_TINY

    from rfkit.models.pretrained import FluxTransformer

    data = write_sd3_shards(tmp_path / "data", n=8)  # the tiny Flux reads the same shapes
    flux = ["--model.model=FluxTransformer", "--model.model.init_args.config=" + json.dumps(FLUX_TINY),
            "--model.model.init_args.latent_size=8", "--model.model.init_args.guidance=2.5",
            '--model.model.init_args.lora={"rank": 2, "alpha": 4}']  # fmt: skip
    fit_sd3_lora(tmp_path / "run", data, 2, *flux)
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    ours = load_checkpoint(ckpt).model
    assert isinstance(ours, FluxTransformer) and ours.guidance == 2.5 and ours.lora.rank == 2
    main(["export", f"--ckpt={ckpt}", f"--out={tmp_path / 'lora'}"])
    theirs = FluxTransformer(config=FLUX_TINY).transformer
    # what FluxPipeline.load_lora_weights does with the folder (alpha = 4 from its metadata: scale 2)
    state, alphas, meta = FluxPipeline.lora_state_dict(
        str(tmp_path / "lora"), return_alphas=True, return_lora_metadata=True
    )
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=theirs, metadata=meta)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    text, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        v = ours.eval()(x, t, {"text": text, "pooled": pooled})
        out = theirs.eval()(
            hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8),
            timestep=1 - t,
            guidance=torch.full((2,), 2.5),
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(5, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
            return_dict=False,
        )[0]
    torch.testing.assert_close(v, -FluxPipeline._unpack_latents(out, 8, 8, vae_scale_factor=1), rtol=1e-5, atol=1e-5)


def test_lora_setting_errors_and_defaults():
    model = SD3Transformer(config=SD3_TINY, latent_size=8, lora=LoRA())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any(".attn.to_add_out.lora_A" in n for n in names) and any(".attn.add_q_proj.lora_A" in n for n in names)
    a = next(m for n, m in model.named_modules() if n.endswith("attn.to_q"))
    assert a.r["default"] == 4 and a.scaling["default"] == 1.0  # rank 4, alpha = rank
    with pytest.raises(ValueError, match=r"lora target 'attn.to_qq' matches no module .* e.g. one of"):
        SD3Transformer(config=SD3_TINY, latent_size=8, lora=LoRA(target_modules=["attn.to_qq"]))


def test_flux_lora_defaults_and_bf16_base_under_autocast():
    """Flux: every default target exists. A bf16 base under bf16 autocast (bf16-mixed) trains float32 adapters."""
    from pretrained_fixtures import FLUX_TINY

    from rfkit.models.pretrained import FluxTransformer
    from rfkit.models.pretrained.lora import FLUX_TARGETS

    model = FluxTransformer(config=FLUX_TINY, latent_size=8, lora=LoRA(), dtype="bfloat16")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for target in FLUX_TARGETS:
        assert any(f".{target}.lora_A." in n for n, _ in trainable), target
    assert all(p.dtype == torch.float32 for _, p in trainable)  # peft keeps adapters in float32
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = {"text": torch.randn(2, 5, 32), "pooled": torch.randn(2, 64)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, t, cond)
    assert v.dtype == torch.float32 and v.shape == x.shape  # shaped and typed like x
    v.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
