"""Prompt encoding the way a diffusers pipeline does it, for shards (``rfkit encode --pipeline``) and
sampling (``rfkit sample --prompts ... --pipeline``).

The pipeline folder (``hf download stabilityai/stable-diffusion-3.5-medium --local-dir DIR``) is loaded
with its text encoders and tokenizers, without its transformer and VAE (not needed to encode a prompt),
and the prompts go through the pipeline's own ``encode_prompt``: SD3's CLIP-L + CLIP-G + T5 and Flux's
CLIP-L + T5 are combined by diffusers' code, never by ours, so the embeddings are exactly what the
pipeline feeds its transformer:

- ``StableDiffusion3Pipeline.encode_prompt`` -> ``text`` = prompt_embeds (77 + T5 tokens, 4096),
  ``pooled`` = pooled_prompt_embeds (2048,) (CLIP-L's and CLIP-G's projections, concatenated);
- ``FluxPipeline.encode_prompt`` -> ``text`` = T5's prompt_embeds (T5 tokens, 4096), ``pooled`` =
  CLIP-L's pooled output (768,).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def _pipeline_classes() -> dict:
    """Pipeline class -> (its encode_prompt's keyword arguments for one prompt set, result index of text, of pooled)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {
        StableDiffusion3Pipeline: ({"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False}, 0, 2),
        FluxPipeline: ({"prompt_2": None}, 0, 1),
    }


class PipelinePrompts:
    """``texts -> (text (B, L, D), pooled (B, D))`` by a local diffusers pipeline's ``encode_prompt``.

    Args:
        folder: a downloaded pipeline folder (``model_index.json``, ``text_encoder*/``, ``tokenizer*/``).
        device: where the text encoders run.
        max_sequence_length: T5 tokens (None: the pipeline's default, SD3 256, Flux 512).
        dtype: the text encoders' dtype ("bfloat16", "float16"; None: as stored, float32 here).
    """

    def __init__(
        self, folder: str | Path, device: str = "cpu", max_sequence_length: int | None = None, dtype: str | None = None
    ) -> None:
        from diffusers import DiffusionPipeline

        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json): download the whole pipeline, "
                "e.g. `hf download stabilityai/stable-diffusion-3.5-medium --local-dir DIR`, and pass DIR"
            )
        kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
        # the transformer and the VAE are not needed to encode prompts: not loaded (SD3.5 Large's is 8B)
        self.pipe = DiffusionPipeline.from_pretrained(
            folder, transformer=None, vae=None, local_files_only=True, **kwargs
        ).to(device)
        classes = _pipeline_classes()
        if type(self.pipe) not in classes:
            raise ValueError(
                f"{folder} holds a {type(self.pipe).__name__}; rfkit encodes prompts with "
                f"{', '.join(c.__name__ for c in classes)} (the pipelines of rfkit's SD3 and Flux adapters)"
            )
        self.kwargs, self.text_index, self.pooled_index = classes[type(self.pipe)]
        if max_sequence_length is not None:
            self.kwargs = {**self.kwargs, "max_sequence_length": max_sequence_length}
        self.folder = folder
        self.device = torch.device(device)
        self.info = {
            "pipeline": str(folder),
            "class": type(self.pipe).__name__,
            "encode_prompt": {k: v for k, v in self.kwargs.items() if v is not None},
        }

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> ``text`` (B, L, D), ``pooled`` (B, D), float32 on the CPU, as ``encode_prompt`` gives them."""
        out = self.pipe.encode_prompt(prompt=list(texts), device=self.device, **self.kwargs)
        return out[self.text_index].float().cpu(), out[self.pooled_index].float().cpu()


def pipeline_vae_decoder(folder: str | Path):
    """Model latents -> images in [-1, 1] by the pipeline's ``vae/`` (None when the folder has none).

    rfkit's model space is the pipeline's: ``z = (latent - shift_factor) * scaling_factor``, so
    ``vae.decode(z / scaling_factor + shift_factor)``, as the pipelines decode. Flux's latents are
    decoded unpacked (B, 16, H, W): the adapter packs and unpacks inside the model.
    """
    from diffusers import AutoencoderKL

    path = Path(folder) / "vae"
    if not (path / "config.json").is_file():
        return None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        return vae.decode(z.float().cpu() / scale + shift).sample.clamp(-1, 1)

    return decode
