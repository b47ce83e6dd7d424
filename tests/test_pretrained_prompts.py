"""Prompts encoded the way the pipeline does it: `rfkit encode --pipeline` stores, and `rfkit sample --prompts
--pipeline` samples with, exactly what `StableDiffusion3Pipeline.encode_prompt` / `FluxPipeline.encode_prompt`
give, on tiny pipeline folders built offline (random text encoders, tokenizers from a tiny vocabulary)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from diffusers import FluxPipeline, StableDiffusion3Pipeline
from pretrained_fixtures import SD3_LORA_TINY, write_flux_pipeline, write_sd3_pipeline, write_sd3_shards

from rfkit.checkpoint import load_checkpoint
from rfkit.cli import main
from rfkit.data.digits import export_images

ROOT = Path(__file__).resolve().parents[1]
T5_TOKENS = 8


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def stored(out: Path, keys=("text", "pooled", "latent")) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {k: [] for k in keys}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            samples: dict[str, dict] = {}
            for m in tar.getmembers():
                key, _, kind = m.name.partition(".")
                samples.setdefault(key, {})[kind.removesuffix(".npy")] = tar.extractfile(m).read()
        for sample in samples.values():
            for k in keys:
                rows[k].append(np.load(io.BytesIO(sample[k]), allow_pickle=False))
    return {k: np.stack(v) for k, v in rows.items()}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_encode_with_a_pipeline_stores_its_encode_prompt(kind, tmp_path):
    write, cls = {"sd3": (write_sd3_pipeline, StableDiffusion3Pipeline), "flux": (write_flux_pipeline, FluxPipeline)}[
        kind
    ]
    pipe_dir = write(tmp_path / "pipe")
    images = export_images(tmp_path / "digits", size=16, limit=6) / "train"
    captions = [p.read_text().strip() for p in sorted(images.glob("*.txt"))]
    out = tmp_path / "shards"
    main(["encode", f"--source={images}", f"--out={out}", f"--pipeline={pipe_dir}", "--resolution=16",
          "--dtype=float32", f"--max_sequence_length={T5_TOKENS}", "--batch_size=4"])  # fmt: skip
    rows = stored(out)
    pipe = cls.from_pretrained(pipe_dir, local_files_only=True)  # the whole pipeline, as a user loads it
    extra = {"prompt_3": None, "do_classifier_free_guidance": False} if kind == "sd3" else {}
    with torch.no_grad():
        result = pipe.encode_prompt(prompt=captions, prompt_2=None, max_sequence_length=T5_TOKENS, **extra)
    text, pooled = (result[0], result[2]) if kind == "sd3" else (result[0], result[1])
    assert text.shape == (6, (77 if kind == "sd3" else 0) + T5_TOKENS, 32) and pooled.shape == (6, 64)
    # encode batches unique captions (4 per call here): equal up to the float rounding of another batch size
    np.testing.assert_allclose(rows["text"], text.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["pooled"], pooled.numpy(), rtol=1e-5, atol=1e-6)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["text_encoder"]["class"] == cls.__name__ and manifest["scaling_factor"] == 1.5035
    assert manifest["vae"]["path"] == str(pipe_dir / "vae") and rows["latent"].shape == (6, 4, 16, 16)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_sample_from_prompts_with_the_pipeline(kind, tmp_path):
    """LoRA on the pipeline folder's transformer -> `rfkit sample --prompts ... --pipeline`: the samples are the
    model's from the stored noise and the pipeline's own prompt embeddings; decoded by the pipeline's VAE."""
    pipe_dir = (write_sd3_pipeline if kind == "sd3" else write_flux_pipeline)(tmp_path / "pipe")
    data = write_sd3_shards(tmp_path / "data", n=4)
    args = [a.format(data=data) for a in SD3_LORA_TINY if not a.startswith("--model.model.init_args.config")]
    if kind == "flux":  # the same config with Flux's adapter (its LoRA targets are Flux's defaults)
        args = ["--model.model=FluxTransformer", *args]
    main(["fit", f"--config={ROOT / 'configs/sd3_lora.yaml'}", *args, f"--model.model.init_args.path={pipe_dir}",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
          "--trainer.logger=false"])  # fmt: skip
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    prompts = ["a red cat", "two dogs"]
    main(["sample", f"--ckpt={ckpt}", f"--out={tmp_path / 'samples'}", "--num_samples=3", "--prompts", *prompts,
          f"--pipeline={pipe_dir}", f"--max_sequence_length={T5_TOKENS}", "--num_steps=2", "--cfg_scale=2.0",
          "--diagnostics_steps=0"])  # fmt: skip
    with torch.no_grad():
        if kind == "sd3":
            pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, local_files_only=True)
            text, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                max_sequence_length=T5_TOKENS,
            )  # fmt: skip
        else:
            pipe = FluxPipeline.from_pretrained(pipe_dir, local_files_only=True)
            text, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=T5_TOKENS)
    rows = torch.tensor([0, 1, 0])  # prompts cycled over the samples
    flow = load_checkpoint(ckpt)
    noise = torch.from_numpy(np.load(tmp_path / "samples/noise.npy"))
    expected = flow.sample(noise, {"text": text[rows], "pooled": pooled[rows]}, num_steps=2, cfg_scale=2.0)
    np.testing.assert_allclose(np.load(tmp_path / "samples/samples.npy"), expected.numpy(), rtol=1e-5, atol=1e-5)
    stats = json.loads((tmp_path / "samples/stats.json").read_text())
    assert stats["decoded_by_vae"] and stats["prompts"] == prompts
    assert type(flow.model).__name__ == {"sd3": "SD3Transformer", "flux": "FluxTransformer"}[kind]
    with pytest.raises(ValueError, match="--prompts needs --pipeline"):
        from rfkit.commands.sample import sample

        sample(ckpt, tmp_path / "s2", num_samples=1, prompts=["a"])


def test_pipeline_folder_errors(tmp_path):
    from rfkit.models.pretrained.prompts import PipelinePrompts

    with pytest.raises(FileNotFoundError, match=r"not a diffusers pipeline folder .*hf download"):
        PipelinePrompts(tmp_path)
    from rfkit.commands.encode import Encoders

    with pytest.raises(ValueError, match="drop --text_encoder"):
        Encoders(None, str(tmp_path), "cpu", 8, pipeline=str(tmp_path))
