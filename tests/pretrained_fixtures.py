"""Tiny random SD3 / Flux transformers: the configs of diffusers' own tests (tests/models/transformers/
test_models_transformer_sd3.py, test_models_transformer_flux.py), built offline from dicts."""

from __future__ import annotations

SD3_TINY = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
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
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
    "guidance_embeds": True,
}
FLUX_TEXT, FLUX_POOLED = 32, 32
