"""Tiny random SD3 / Flux transformers: the configs of diffusers' own tests (tests/models/transformers/
test_models_transformer_sd3.py, test_models_transformer_flux.py), built offline from dicts."""

from __future__ import annotations

import json

SD3_TINY = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,  # diffusers' tests: 1 or 4; the last block has no to_add_out, a LoRA default target
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 96,
}
SD3_TEXT, SD3_POOLED = 32, 64

FLUX_TINY = {  # diffusers' test config, with the guidance embedding of Flux.1-dev
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels, packed 2x2
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,  # diffusers' test: 32; 64 reads the same shards as the tiny SD3
    "axes_dims_rope": [4, 4, 8],
    "guidance_embeds": True,
}
FLUX_TEXT, FLUX_POOLED = 32, 64


def write_sd3_shards(root, n: int = 24, size: int = 8, seed: int = 0):
    """Latent shards for the tiny SD3: latents (4, size, size), text (5, 32), pooled (64); train/ and val/."""
    import numpy as np

    from rfkit.data import LatentShardWriter

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        with LatentShardWriter(root / split, 8) as out:
            for _ in range(n):
                out.write(
                    {
                        "latent": rng.standard_normal((4, size, size)).astype(np.float32),
                        "text": rng.standard_normal((5, SD3_TEXT)).astype(np.float32),
                        "pooled": rng.standard_normal(SD3_POOLED).astype(np.float32),
                    }
                )
    return root


SD3_LORA_TINY = [
    "--model.model.init_args.path=null",
    "--model.model.init_args.config=" + json.dumps(SD3_TINY).replace("{", "{{").replace("}", "}}"),  # str.format
    "--model.model.init_args.latent_size=8",
    "--model.model.init_args.dtype=null",
    "--trainer.precision=32-true",
    "--data.init_args.shards={data}/train",
    "--data.init_args.val_shards={data}/val",
    "--data.init_args.batch_size=4",
    "--data.init_args.batches_per_epoch=6",
    "--data.init_args.num_workers=0",
    "--model.sample_steps=2",
]
"""configs/sd3_lora.yaml on the tiny SD3 (random weights from its config), shards from write_sd3_shards;
``{data}`` is formatted with the shards' folder (test_cli's TINY convention)."""
