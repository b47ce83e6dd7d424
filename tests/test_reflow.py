"""`rfkit reflow`: pairs from any number of ranks, exactly once, reproducible, resumable; a 2-RF
flow trained on them (initialised from its teacher) is straighter than the teacher."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scale_fixtures import child_env

import rfkit
from rfkit.cli import main
from rfkit.commands import reflow as reflow_module
from rfkit.diagnostics import flow_stats
from rfkit.distributed import stream_seed
from rfkit.sampling import guided_velocity

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false"]


def teacher_fit(run: Path, steps: int, *extra: str) -> Path:
    main(
        [
            "fit",
            f"--config={ROOT / 'configs/toy2d.yaml'}",
            f"--trainer.default_root_dir={run}",
            f"--trainer.max_steps={steps}",
            "--model.coupling=Independent",
            "--data.init_args.batches_per_epoch=100000",
            *QUIET,
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
            *extra,
        ]
    )
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return teacher_fit(tmp_path_factory.mktemp("teacher"), 300)


def read_pairs(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """shard name -> {"noise": (n, 2), "latent": (n, 2)}, in the order stored."""
    found = {}
    for shard in sorted(out.glob("shard-*.tar")):
        members = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, kind = m.name.partition(".")
                members.setdefault(key, {})[kind] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
        keys = sorted(members)
        found[shard.name] = {k: np.stack([members[s][f"{k}.npy"] for s in keys]) for k in ("noise", "latent")}
    return found


def run_reflow(ckpt: Path, out: Path, *extra: str) -> None:
    main(
        [
            "reflow",
            f"--ckpt={ckpt}",
            f"--out={out}",
            "--num_pairs=300",
            "--samples_per_shard=50",
            "--num_steps=4",
            "--batch_size=32",
            *extra,
        ]
    )


def test_pairs_from_two_ranks_are_all_present_once_and_reproduce(teacher, tmp_path):
    run_reflow(teacher, tmp_path / "one")
    cmd = [
        Path(sys.executable).with_name("torchrun"),
        "--nproc_per_node=2",
        "-m",
        "rfkit.cli",
        "reflow",
        f"--ckpt={teacher}",
        f"--out={tmp_path / 'two'}",
        "--num_pairs=300",
        "--samples_per_shard=50",
        "--num_steps=4",
        "--batch_size=32",
    ]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("num_pairs: 300") == 1  # one report, from rank 0
    two = read_pairs(tmp_path / "two")
    assert sorted(two) == [f"shard-{k:06d}.tar" for k in range(6)] and not list((tmp_path / "two").glob("part-*"))
    flow = rfkit.load_checkpoint(teacher)
    for k, name in enumerate(sorted(two)):
        # the same shard, whichever rank made it, byte for byte
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        # its noise is shard k's seeded draw, and the teacher's ODE maps it to the stored samples
        noise = torch.randn((50, 2), generator=torch.Generator().manual_seed(stream_seed(0, k)))
        np.testing.assert_array_equal(two[name]["noise"], noise.numpy())
        again = flow.sample(noise, {}, num_steps=4)
        np.testing.assert_allclose(two[name]["latent"], again.numpy(), rtol=1e-5, atol=1e-5)
    noises = np.concatenate([p["noise"] for p in two.values()])
    assert len(noises) == 300 and len({row.tobytes() for row in noises}) == 300
    manifest = (tmp_path / "two" / "dataset.json").read_text()
    assert '"num_samples": 300' in manifest and str(teacher) in manifest and "Euler()" in manifest


def test_a_crashed_reflow_resumes_to_the_same_pairs(teacher, tmp_path, monkeypatch):
    run_reflow(teacher, tmp_path / "clean")
    calls = {"n": 0}
    original = reflow_module.LatentShardWriter.write

    def crash_on_the_third_shard(self, sample):
        calls["n"] += 1
        if calls["n"] > 120:
            raise RuntimeError("simulated crash")
        return original(self, sample)

    monkeypatch.setattr(reflow_module.LatentShardWriter, "write", crash_on_the_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_reflow(teacher, tmp_path / "crashed")
    assert len(list((tmp_path / "crashed").glob("part-*/shard-*.tar"))) == 2  # only whole shards survive
    monkeypatch.setattr(reflow_module.LatentShardWriter, "write", original)
    run_reflow(teacher, tmp_path / "crashed")
    for name in (f"shard-{k:06d}.tar" for k in range(6)):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "crashed" / name).read_bytes()


def test_class_conditional_teacher_gets_every_label_in_turn(tmp_path):
    run = tmp_path / "digits"
    main(
        [
            "fit",
            f"--config={ROOT / 'configs/digits.yaml'}",
            f"--trainer.default_root_dir={run}",
            "--trainer.max_steps=2",
            "--model.model.init_args.width=32",
            "--model.model.init_args.depth=1",
            "--data.init_args.batch_size=16",
            *QUIET,
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
        ]
    )
    main(
        [
            "reflow",
            f"--ckpt={run / 'checkpoints/last.ckpt'}",
            f"--out={tmp_path / 'pairs'}",
            "--num_pairs=25",
            "--samples_per_shard=10",
            "--num_steps=2",
        ]
    )
    labels = []
    for shard in sorted((tmp_path / "pairs").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            labels += [
                int(tar.extractfile(m).read())
                for m in sorted(tar.getmembers(), key=lambda m: m.name)
                if m.name.endswith(".cls")
            ]
    assert labels == [i % 10 for i in range(25)]


def test_two_rectified_flow_is_straighter_than_its_teacher(tmp_path):
    teacher = teacher_fit(tmp_path / "1rf", 800)
    main(
        [
            "reflow",
            f"--ckpt={teacher}",
            f"--out={tmp_path / 'pairs'}",
            "--num_pairs=4000",
            "--num_steps=40",
            "--samples_per_shard=1000",
            "--batch_size=1000",
        ]
    )
    student_run = tmp_path / "2rf"
    main(
        [
            "fit",
            f"--config={ROOT / 'configs/toy2d_reflow.yaml'}",
            f"--trainer.default_root_dir={student_run}",
            "--trainer.max_steps=400",
            f"--data.init_args.shards={tmp_path / 'pairs'}",
            "--data.init_args.val_shards=null",
            *QUIET,
            "--trainer.callbacks+=InitFromCheckpoint",
            f"--trainer.callbacks.path={teacher}",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
        ]
    )
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(123))
    before = flow_stats(guided_velocity(rfkit.load_checkpoint(teacher).model, {}), x0, 100)
    after = flow_stats(guided_velocity(rfkit.load_checkpoint(student_run / "checkpoints/last.ckpt").model, {}), x0, 100)
    print(f"straightness: teacher {before.straightness:.4f}, 2-RF {after.straightness:.4f}")
    assert after.straightness < 0.25 * before.straightness, (before, after)


def test_init_from_checkpoint_starts_at_the_teacher_and_refuses_another_architecture(teacher, tmp_path):
    # with a zero learning rate, the student after training is exactly where it started
    pairs = tmp_path / "pairs"
    run_reflow(teacher, pairs)
    args = [
        "fit",
        f"--config={ROOT / 'configs/toy2d_reflow.yaml'}",
        "--trainer.max_steps=3",
        f"--data.init_args.shards={pairs}",
        "--data.init_args.val_shards=null",
        "--data.init_args.batch_size=16",
        "--model.optimizer.init_args.lr=0.0",
        *QUIET,
        "--trainer.callbacks+=InitFromCheckpoint",
        f"--trainer.callbacks.path={teacher}",
    ]
    main(
        [
            *args,
            f"--trainer.default_root_dir={tmp_path / 'a'}",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
        ]
    )
    student = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    original = torch.load(teacher, weights_only=True)["state_dict"]
    for key in original:
        assert torch.equal(student[key], original[key]), key
    with pytest.raises(ValueError, match="does not fit this run's model"):
        main([*args, f"--trainer.default_root_dir={tmp_path / 'b'}", "--model.model.init_args.width=32"])


def test_reflow_refuses_a_missing_condition_and_a_foreign_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(SystemExit, match="not an rfkit checkpoint"):
        main(["reflow", f"--ckpt={bad}", f"--out={tmp_path / 'o'}"])
