"""``rfkit encode``: images (+ captions) -> latent shards + ``dataset.json``, once, for many trainings.

    rfkit encode --source images/ --out data/latents --vae /models/sd3/vae --resolution 256

Source: a folder of images (``.png .jpg .jpeg .webp``, searched recursively, sorted by path) with
optional sidecars of the same stem, ``cat.txt`` (caption) and ``cat.cls`` (integer label), or
webdataset image shards (``imgs/shard-{000000..000099}.tar``) whose samples hold an image, ``txt``
and ``cls`` alike. Every image becomes one sample of :mod:`rfkit.data.schema`:

- ``latent``: ``AutoencoderKL(image).latent_dist.mean`` from a diffusers VAE on a local path
  (``--vae``), kept unscaled; the VAE's ``scaling_factor``/``shift_factor`` go to the manifest.
  Without ``--vae`` the pixels themselves are the latent (in [-1, 1]).
- ``text`` / ``pooled``: a Hugging Face text encoder on a local path (``--text_encoder``):
  the last hidden states of the caption, padded or cut to ``--max_text_tokens`` with padding
  zeroed (L, D), and their mean over the real tokens (D,) (sentence-transformers' pooling).
  Or, with ``--pipeline DIR`` (a downloaded SD3 / Flux pipeline), the pipeline's own
  ``encode_prompt``: ``text`` = prompt_embeds (L, D), ``pooled`` = pooled_prompt_embeds (D,),
  exactly what the pipeline feeds its transformer (:mod:`rfkit.models.pretrained.prompts`); the
  latents then come from its ``vae/`` unless ``--vae`` is given.
- ``cls``: the label sidecar, if every image has one.

Images are resized to cover ``--resolution`` (or, with ``--aspect_buckets``, the bucket of about
``resolution**2`` pixels nearest their aspect ratio) and centre-cropped. Shards are numbered from
the input order; a rerun into the same directory skips the finished shards (resume).
diffusers and transformers are the optional extra ``pip install 'rfkit[encode]'``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from rfkit.data.schema import MANIFEST, shard_name
from rfkit.data.writer import LatentShardWriter

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Item:
    """One input: an image (bytes, or a file read when needed), where it came from, its caption and label."""

    source: str
    data: bytes | Path
    caption: str | None = None
    cls: int | None = None


def read_folder(root: Path) -> Iterator[Item]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    for path in files:
        txt, cls = path.with_suffix(".txt"), path.with_suffix(".cls")
        caption = txt.read_text().strip() if txt.exists() else None
        yield Item(str(path), path, caption, int(cls.read_text()) if cls.exists() else None)  # read if encoded


def read_shards(spec: str) -> Iterator[Item]:
    from webdataset import gopen
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    for url in expand_urls(spec):
        with gopen(url) as stream:
            for sample in group_by_keys(dict(s, __url__=url) for s in tar_file_iterator(stream)):
                image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                where = f"{url}: sample {sample['__key__']}"
                if image is None:
                    raise ValueError(f"{where} holds no image ({', '.join(IMAGE_EXTS)}); it has {sorted(sample)}")
                caption = sample["txt"].decode().strip() if "txt" in sample else None
                yield Item(where, image, caption, int(sample["cls"]) if "cls" in sample else None)


# ---------------------------------------------------------------------------------- images


def aspect_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, of at most resolution**2 pixels, aspect 1:2 .. 2:1."""
    out = []
    for w in range(step, 2 * resolution + 1, step):
        h = resolution * resolution // w // step * step
        if h >= step and 0.5 <= w / h <= 2:
            out.append((w, h))
    return out


def target_size(image: Image.Image, resolution: int, buckets: list[tuple[int, int]] | None) -> tuple[int, int]:
    if not buckets:
        return resolution, resolution
    ratio = math.log(image.width / image.height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to cover ``size`` (w, h), centre-crop, scale to [-1, 1]: (C, h, w) float32."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    cover = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(cover, Image.Resampling.BICUBIC)
    left, top = (cover[0] - w) // 2, (cover[1] - h) // 2
    pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------- models


class Encoders:
    """The VAE and text encoder (either may be absent), on one device, in inference mode."""

    def __init__(
        self,
        vae: str | None,
        text_encoder: str | None,
        device: str,
        max_tokens: int,
        pipeline: str | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.vae = self.tokenizer = self.text = self.prompts = None
        self.info: dict = {"vae": None, "text_encoder": None}
        if pipeline is not None and text_encoder is not None:
            raise ValueError("--pipeline encodes captions with the pipeline's own text encoders: drop --text_encoder")
        if pipeline is not None and vae is None and (Path(pipeline) / "vae" / "config.json").is_file():
            vae = str(Path(pipeline) / "vae")  # the pipeline's latents, unless --vae says otherwise
        try:
            if vae is not None:
                from diffusers import AutoencoderKL

                self.vae = AutoencoderKL.from_pretrained(_local(vae, "--vae"), local_files_only=True)
                self.vae.to(self.device).eval()
                self.info["vae"] = {"path": str(vae), "class": "AutoencoderKL", "config": dict(self.vae.config)}
            if text_encoder is not None:
                from transformers import AutoModel, AutoTokenizer

                path = _local(text_encoder, "--text_encoder")
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.text = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
                self.info["text_encoder"] = {
                    "path": str(text_encoder),
                    "model_type": self.text.config.model_type,
                    "max_tokens": max_tokens,
                    "pooling": "mean",
                }
            if pipeline is not None:
                from rfkit.models.pretrained.prompts import PipelinePrompts

                self.text = self.prompts = PipelinePrompts(_local(pipeline, "--pipeline"), device, max_sequence_length)
                self.info["text_encoder"] = self.prompts.info
        except ImportError as err:
            raise ImportError(f"{err.name} is missing: rfkit encode needs `pip install 'rfkit[encode]'`") from None

    @torch.inference_mode()
    def latents(self, pixels: np.ndarray) -> np.ndarray:
        """(B, C, H, W) in [-1, 1] -> (B, c, h, w) VAE means (or the pixels, without a VAE)."""
        if self.vae is None:
            return pixels
        x = torch.from_numpy(pixels).to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float().cpu().numpy()

    @torch.inference_mode()
    def captions(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> text (B, L, D) with padding zeroed, pooled (B, D) = mean over the real tokens; with a
        pipeline, its ``encode_prompt``'s prompt_embeds and pooled_prompt_embeds."""
        if self.prompts is not None:
            text, pooled = self.prompts(texts)
            return text.numpy(), pooled.numpy()
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.text(**tokens).last_hidden_state.float()  # (B, L, D)
        mask = tokens["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return (hidden * mask).cpu().numpy(), pooled.cpu().numpy()


def _local(path: str, flag: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory (a model saved with save_pretrained)")
    return path


# ---------------------------------------------------------------------------------- encoding


def write_latent_shards(
    source: str,
    out: str | Path,
    *,
    encoders: Encoders,
    resolution: int = 256,
    bucket_step: int | None = None,
    grayscale: bool = False,
    batch_size: int = 16,
    samples_per_shard: int = 1000,
    dtype: str = "float16",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    progress: bool = True,
) -> Path:
    """Encodes ``source`` into latent shards in ``out``; see the module docstring. Returns ``out``."""
    from tqdm import tqdm

    local = Path(source)
    items = read_folder(local) if local.is_dir() else read_shards(source)
    total = sum(1 for _ in local.rglob("*") if _.suffix.lower().lstrip(".") in IMAGE_EXTS) if local.is_dir() else None
    vae = encoders.vae.config if encoders.vae is not None else {}
    manifest = {
        "scaling_factor": scaling_factor if scaling_factor is not None else vae.get("scaling_factor", 1.0),
        "shift_factor": shift_factor if shift_factor is not None else (vae.get("shift_factor") or 0.0),
        **encoders.info,
        "image": {"resolution": resolution, "aspect_bucket_step": bucket_step, "grayscale": grayscale},
    }
    buckets = aspect_buckets(resolution, bucket_step) if bucket_step else None
    bar = tqdm(total=total, unit="img", disable=not progress, desc=f"encode -> {out}")
    with LatentShardWriter(out, samples_per_shard, manifest) as writer:
        for index in itertools.count():
            chunk = list(itertools.islice(items, samples_per_shard))
            if not chunk:
                break
            if writer.is_complete(index):  # resume: finished by an earlier run
                done = writer.finished[shard_name(index)]["samples"]
                if done != len(chunk):
                    raise ValueError(f"{shard_name(index)} holds {done} samples, the input now gives {len(chunk)}")
                writer.skip_shard()
            else:
                for sample in encode_chunk(chunk, encoders, resolution, buckets, grayscale, batch_size, dtype):
                    writer.write(sample)
            bar.update(len(chunk))
    bar.close()
    return Path(out)


def encode_chunk(chunk, encoders, resolution, buckets, grayscale, batch_size, dtype) -> list[dict]:
    """One shard's worth of items -> samples in input order; images of one size are encoded together."""
    labelled = [it.cls is not None for it in chunk]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{chunk[labelled.index(False)].source} has no label while others have one")
    if encoders.text is not None and any(it.caption is None for it in chunk):
        raise ValueError(f"{next(it.source for it in chunk if it.caption is None)} has no caption (.txt)")
    pixels = []
    for it in chunk:
        try:
            data = it.data if isinstance(it.data, bytes) else it.data.read_bytes()
            image = Image.open(io.BytesIO(data)).convert("L" if grayscale else "RGB")
        except Exception as err:
            raise ValueError(f"{it.source}: not a readable image ({err})") from None
        pixels.append(to_array(image, target_size(image, resolution, buckets)))
    samples: list[dict] = [{} for _ in chunk]
    by_size: dict[tuple, list[int]] = {}
    for i, p in enumerate(pixels):
        by_size.setdefault(p.shape, []).append(i)
    for idx in by_size.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            for i, z in zip(part, encoders.latents(np.stack([pixels[i] for i in part])), strict=True):
                samples[i]["latent"] = z.astype(dtype)
    if encoders.text is not None:
        unique = sorted({it.caption for it in chunk})  # captions repeat (class-like ones a lot): encode each once
        done = {}
        for start in range(0, len(unique), batch_size):
            part = unique[start : start + batch_size]
            text, pooled = encoders.captions(part)
            done.update(zip(part, zip(text, pooled, strict=True), strict=True))
    for sample, it in zip(samples, chunk, strict=True):
        if encoders.text is not None:
            text, pooled = done[it.caption]
            sample["text"], sample["pooled"] = text.astype(dtype), pooled.astype(dtype)
        if it.cls is not None:
            sample["cls"] = it.cls
    return samples


def encode(
    source: str,
    out: Path,
    vae: Path | None = None,
    text_encoder: Path | None = None,
    max_text_tokens: int = 77,
    pipeline: Path | None = None,
    max_sequence_length: int | None = None,
    resolution: int = 256,
    aspect_buckets: int | None = None,
    grayscale: bool = False,
    batch_size: int = 16,
    samples_per_shard: int = 1000,
    dtype: Literal["float16", "float32"] = "float16",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    device: str | None = None,
) -> dict:
    """Encode images (+ captions, labels) into latent shards and their dataset.json; reruns resume.

    Args:
        source: a folder of images (with ``.txt`` captions and ``.cls`` labels beside them) or image
            shards (a brace pattern, e.g. ``imgs/shard-{000000..000099}.tar``).
        out: the directory for ``shard-NNNNNN.tar`` and ``dataset.json``.
        vae: local folder of a diffusers AutoencoderKL (default: the pixels are the latents).
        text_encoder: local folder of a Hugging Face text encoder (e.g. all-MiniLM-L6-v2).
        max_text_tokens: caption tokens kept, padded with zeros (``--text_encoder``).
        pipeline: local folder of a diffusers SD3 or Flux pipeline: captions are encoded by its own
            ``encode_prompt`` (``text`` = prompt_embeds (L, D), ``pooled`` = pooled_prompt_embeds (D,)),
            and images by its ``vae/`` unless ``--vae`` is given.
        max_sequence_length: T5 tokens of ``--pipeline``'s prompts (default: the pipeline's, SD3 256, Flux 512).
        resolution: image side in pixels.
        aspect_buckets: keep aspect ratios, in buckets of sides k * aspect_buckets pixels.
        grayscale: encode one grey channel instead of RGB.
        batch_size: images per encoder call.
        samples_per_shard: samples per shard.
        dtype: stored precision.
        scaling_factor: override the VAE's scaling_factor in the manifest.
        shift_factor: override the VAE's shift_factor in the manifest.
        device: where the encoders run (default: cuda if available, else cpu).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = Encoders(
        str(vae) if vae else None,
        str(text_encoder) if text_encoder else None,
        device,
        max_text_tokens,
        pipeline=str(pipeline) if pipeline else None,
        max_sequence_length=max_sequence_length,
    )
    written = write_latent_shards(
        source,
        out,
        encoders=encoders,
        resolution=resolution,
        bucket_step=aspect_buckets,
        grayscale=grayscale,
        batch_size=batch_size,
        samples_per_shard=samples_per_shard,
        dtype=dtype,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    manifest = json.loads((written / MANIFEST).read_text())
    shards = manifest["shards"]
    return {"out": str(written), "shards": len(shards), "samples": sum(s["samples"] for s in shards)}
