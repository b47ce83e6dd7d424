"""Tiny random SD3 / Flux transformers: the configs of diffusers' own tests (tests/models/transformers/
test_models_transformer_sd3.py, test_models_transformer_flux.py), built offline from dicts."""

from __future__ import annotations

import json
from pathlib import Path

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


def fit_sd3_lora(run_dir: Path, data: Path, steps: int, *extra: str):
    """`rfkit fit --config configs/sd3_lora.yaml` on the tiny SD3, without validation (speed); returns the CLI."""
    from rfkit.cli import RFKitCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "sd3_lora.yaml"
    args = [a.format(data=data) for a in SD3_LORA_TINY]
    return RFKitCLI(
        args=["fit", f"--config={config}", f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={steps}",
              "--trainer.limit_val_batches=0", "--model.lr_scheduler=null", *args, *extra]
    )  # fmt: skip


def _tokenizers():
    """A CLIP and a T5 tokenizer built offline from a tiny vocabulary (lowercase letters; words split into
    letters), as transformers builds them from vocab files; diffusers' tests download hf-internal-testing's."""
    import string

    from transformers import CLIPTokenizer, T5Tokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase] + [("\u2581" + c, -3.0) for c in string.ascii_lowercase]
    return clip, T5Tokenizer(vocab=pieces, extra_ids=0)


def _tiny_vae():
    """diffusers' SD3 pipeline test VAE: 4 latent channels, no downsampling, SD3's scaling and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0)
    )


def write_sd3_pipeline(folder):
    """A tiny StableDiffusion3Pipeline folder as `save_pretrained` writes it (diffusers' pipeline test sizes):
    two CLIPTextModelWithProjection (projection 32: pooled 64), a T5 encoder (d_model 32), SD3_TINY, the tiny VAE."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip_tok, t5_tok = _tokenizers()
    clip = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=100, hidden_act="gelu", projection_dim=32,
    )  # fmt: skip
    StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3_TINY),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(clip),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5(32),
        tokenizer_3=t5_tok,
    ).save_pretrained(folder)
    return folder


def write_flux_pipeline(folder):
    """A tiny FluxPipeline folder: CLIPTextModel (hidden 64: pooled 64), T5 (d_model 32), FLUX_TINY, the tiny VAE."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip_tok, t5_tok = _tokenizers()
    clip = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=64, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=100, hidden_act="gelu",
    )  # fmt: skip
    FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX_TINY),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(clip),
        tokenizer=clip_tok,
        text_encoder_2=_t5(32),
        tokenizer_2=t5_tok,
    ).save_pretrained(folder)
    return folder
