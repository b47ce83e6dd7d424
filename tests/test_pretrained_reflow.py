"""Reflow of a pretrained (here tiny, random) SD3 teacher, as configs/sd3_lora.yaml -> `rfkit reflow
--prompts_from` -> configs/sd3_reflow.yaml run it: the pairs hold the teacher's captions in order
(cycled), and each pair is the teacher's guided Euler ODE from its noise, recomputed here with
diffusers' transformer called directly; the LoRA student trains on them from the teacher's adapters."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

import itertools

from pretrained_fixtures import SD3_TINY, write_sd3_shards

from rfkit.checkpoint import load_checkpoint
from rfkit.cli import RFKitCLI, main
from rfkit.commands.reflow import reflow
from rfkit.data import LatentShardWriter
from rfkit.distributed import stream_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # the tiny SD3 in place of SD3.5 Medium; float32 on the CPU; no validation (speed)
    "--model.model.init_args.path=null",
    "--model.model.init_args.config=" + json.dumps(SD3_TINY),
    "--model.model.init_args.latent_size=8",
    "--model.model.init_args.dtype=null",
    "--trainer.precision=32-true",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
]
CFG, STEPS, SHIFT = 3.0, 3, 3.0


def read_tar_rows(folder: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every sample's ``keys`` in the shards of ``folder``, in shard order and stored order (tarfile, not rfkit)."""
    rows: dict[str, list] = {k: [] for k in keys}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            samples: dict[str, dict] = {}
            for m in tar.getmembers():
                key, _, kind = m.name.partition(".")
                samples.setdefault(key, {})[kind.removesuffix(".npy")] = tar.extractfile(m).read()
        for key in samples:  # tar order is the writer's order
            for k in keys:
                rows[k].append(np.load(io.BytesIO(samples[key][k]), allow_pickle=False))
    return {k: np.stack(v) for k, v in rows.items()}


def guided_euler(transformer, noise, text, pooled) -> torch.Tensor:
    """The teacher's sampler, written from diffusers' side: sigma from 1 to 0 on SD3's shifted grid, Euler steps
    ``x += (sigma_next - sigma) out`` on the guided output ``out_null + s (out_cond - out_null)``, zero null."""
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1, dtype=torch.float64)
    sigmas = (SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)).float()
    x = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            timestep = torch.full((len(x),), 1000 * float(sigma))
            out_cond = transformer(x, text, pooled, timestep=timestep, return_dict=False)[0]
            out_null = transformer(
                x, torch.zeros_like(text), torch.zeros_like(pooled), timestep=timestep, return_dict=False
            )[0]
            x = x + (sigma_next - sigma) * (out_null + CFG * (out_cond - out_null))
    return x


def test_reflow_of_a_lora_sd3_teacher_with_cfg_and_its_captions_then_a_lora_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' own relative paths: runs/sd3_lora, data/sd3, data/sd3_reflow
    write_sd3_shards(Path("data/sd3"), n=6)  # 6 captions: 8 pairs cycle through them
    main(["fit", f"--config={ROOT / 'configs/sd3_lora.yaml'}", *TINY, "--trainer.max_steps=2",
          "--model.model.init_args.lora.alpha=16", "--model.optimizer.init_args.lr=0.01",
          "--trainer.callbacks+=rfkit.ema.EMA", "--trainer.callbacks.decay=0.5"])  # fmt: skip
    teacher = Path("runs/sd3_lora/checkpoints/last.ckpt")
    with pytest.raises(ValueError, match=r"needs conditioning \['pooled', 'text'\]: pass --prompts_from"):
        reflow(teacher, Path("nowhere"), num_pairs=2)
    with pytest.raises(ValueError, match="holds none of the teacher's conditioning"):
        with LatentShardWriter(Path("data/plain"), 2) as plain:  # latents without captions
            plain.write({"latent": np.zeros((4, 8, 8), np.float32)})
        reflow(teacher, Path("nowhere"), num_pairs=2, prompts_from="data/plain")
    main(["reflow", f"--ckpt={teacher}", "--out=data/sd3_reflow", "--prompts_from=data/sd3/train", "--num_pairs=8",
          "--num_val_pairs=4", "--samples_per_shard=3", f"--num_steps={STEPS}", f"--cfg_scale={CFG}",
          f"--shift={SHIFT}", "--batch_size=2"])  # fmt: skip

    pairs = read_tar_rows(Path("data/sd3_reflow"), ("noise", "latent", "text", "pooled"))
    captions = read_tar_rows(Path("data/sd3/train"), ("text", "pooled"))
    assert len(pairs["noise"]) == 8 and len(captions["text"]) == 6
    for key in ("text", "pooled"):  # pair i: caption i mod 6 of the teacher's shards, in their order
        np.testing.assert_array_equal(pairs[key], captions[key][np.arange(8) % 6])
    noise = torch.cat(  # shard k's noise: its own seeded draw (3 pairs per shard, the last one 2)
        [torch.randn((min(3, 8 - 3 * k), 4, 8, 8), generator=torch.Generator().manual_seed(stream_seed(0, k)))
         for k in range(3)]
    )  # fmt: skip
    np.testing.assert_array_equal(pairs["noise"], noise.numpy())
    transformer = load_checkpoint(teacher).model.transformer.eval()  # the teacher's EMA adapters on the base
    lora_b = [p for n, p in transformer.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters the pairs come from are not the base's
    text, pooled = (torch.from_numpy(pairs[k]) for k in ("text", "pooled"))
    expected = guided_euler(transformer, noise, text, pooled)
    np.testing.assert_allclose(pairs["latent"], expected.numpy(), rtol=1e-4, atol=1e-4)
    manifest = json.loads(Path("data/sd3_reflow/dataset.json").read_text())
    assert manifest["reflow"]["prompts_from"] == "data/sd3/train" and manifest["reflow"]["cfg_scale"] == CFG
    val = read_tar_rows(Path("data/sd3_reflow/val"), ("text",))
    np.testing.assert_array_equal(val["text"], captions["text"][:4])

    student = RFKitCLI(
        args=[
            "fit",
            f"--config={ROOT / 'configs/sd3_reflow.yaml'}",
            *TINY,
            "--trainer.max_steps=3",
            "--model.model.init_args.lora.alpha=16",
            "--data.init_args.val_shards=null",
        ]
    ).model
    trained = dict(student.model.transformer.named_parameters())
    moved, teacher_b = 0.0, 0.0
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            moved = max(moved, (trained[name] - p).abs().max().item())
            teacher_b = max(teacher_b, p.abs().max().item() if "lora_B" in name else 0.0)
        else:  # the base stays bit-identical
            assert torch.equal(trained[name], p), name
    # started from the teacher's adapters (B ~ 1e-2 after its lr-0.01 steps; fresh B are 0), then trained:
    # 3 AdamW steps of lr 1e-4 move each weight by about 3e-4
    assert 0 < moved < 2e-3 and teacher_b > 10 * moved, (moved, teacher_b)
    saved = torch.load("runs/sd3_reflow/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert {k for k in saved if "lora_" not in k} == {"model.base_sha256_bytes"}  # a LoRA student: adapters only
    assert type(student.coupling).__name__ == "Reflow"

    # a fully fine-tuned student of the LoRA teacher starts from the adapters merged into the base (lr 0: as started)
    full = RFKitCLI(
        args=["fit", f"--config={ROOT / 'configs/sd3_reflow.yaml'}", *TINY, "--trainer.max_steps=1",
              "--model.model.init_args.lora=null", "--model.optimizer.init_args.lr=0.0",
              "--data.init_args.val_shards=null", "--trainer.default_root_dir=runs/sd3_reflow_full"]
    ).model.model  # fmt: skip
    assert full.lora is None and all(p.requires_grad for p in full.parameters())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    cond = {"text": torch.randn(2, 5, 32, generator=g), "pooled": torch.randn(2, 64, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(x, t, cond), load_checkpoint(teacher).model.eval()(x, t, cond))
