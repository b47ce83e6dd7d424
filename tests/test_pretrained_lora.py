"""LoRA on a pretrained (here tiny, random) SD3 through `rfkit fit`: only the adapters train and are
saved, the base stays bit-identical, resuming continues, and another base is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from pretrained_fixtures import SD3_LORA_TINY, SD3_TINY, write_sd3_shards

from rfkit.checkpoint import load_checkpoint
from rfkit.cli import RFKitCLI
from rfkit.models.pretrained import LoRA, SD3Transformer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sd3_lora.yaml"


def fit(run_dir: Path, data: Path, steps: int, *extra: str) -> RFKitCLI:
    """`rfkit fit --config configs/sd3_lora.yaml` on the tiny SD3, without validation (speed)."""
    args = [a.format(data=data) for a in SD3_LORA_TINY]
    return RFKitCLI(
        args=["fit", f"--config={CONFIG}", f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={steps}",
              "--trainer.limit_val_batches=0", "--model.lr_scheduler=null", *args, *extra]
    )  # fmt: skip


def base_and_adapters(model: SD3Transformer) -> tuple[dict, dict]:
    base, adapters = {}, {}
    for name, p in model.transformer.named_parameters():
        (adapters if "lora_" in name else base)[name.replace(".base_layer", "")] = p.detach().clone()
    return base, adapters


def test_lora_fit_trains_only_adapters_saves_them_alone_and_resumes(tmp_path):
    data = write_sd3_shards(tmp_path / "data")
    trained = fit(tmp_path / "run", data, 3).model.model
    base, adapters = base_and_adapters(trained)
    fresh = dict(SD3Transformer(config=SD3_TINY, latent_size=8).transformer.named_parameters())  # the base, rebuilt
    assert base.keys() == fresh.keys()
    assert all(torch.equal(base[k], fresh[k]) for k in base)  # bit-identical after 3 AdamW steps
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at 0
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)

    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    saved = ckpt["state_dict"]
    assert {k for k in saved if "lora_" not in k} == {"model._extra_state"}  # adapters only, plus the base's name
    assert saved["model._extra_state"]["sha256"] == trained.base_sha256 and len(trained.base_sha256) == 64
    assert len(ckpt["optimizer_states"][0]["state"]) == len(adapters)  # the optimizer holds the adapters only

    module = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")  # what `rfkit sample` does
    for name, value in adapters.items():
        assert torch.equal(dict(module.model.transformer.named_parameters())[name], value)

    resumed = fit(tmp_path / "run", data, 5)  # the same command, longer: resumes from last.ckpt at step 3
    assert resumed.trainer.global_step == 5
    base2, adapters2 = base_and_adapters(resumed.model.model)
    assert all(torch.equal(base2[k], fresh[k]) for k in base2)
    assert any(not torch.equal(adapters2[k], adapters[k]) for k in adapters)

    with pytest.raises(ValueError, match=r"trained on base config .* adapters only work on the base they were trained"):
        fit(tmp_path / "run", data, 7, "--model.model.init_args.seed=1")  # another random base: refused at resume


def test_lora_setting_errors_and_defaults():
    model = SD3Transformer(config=SD3_TINY, latent_size=8, lora=LoRA())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any(".attn.to_add_out.lora_A" in n for n in names) and any(".attn.add_q_proj.lora_A" in n for n in names)
    a = next(m for n, m in model.named_modules() if n.endswith("attn.to_q"))
    assert a.r["default"] == 4 and a.scaling["default"] == 1.0  # rank 4, alpha = rank
    with pytest.raises(ValueError, match=r"lora target 'attn.to_qq' matches no module .* e.g. one of"):
        SD3Transformer(config=SD3_TINY, latent_size=8, lora=LoRA(target_modules=["attn.to_qq"]))
