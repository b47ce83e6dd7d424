"""DDP and FSDP2 on 2 real processes (gloo) against 1 process on the same global batch.

Noise, t and label drops follow the global row whoever draws it (rfkit.draws), and OT is
solved across ranks, so 2 ranks x 32 rows must train like 1 process x 64 rows: the same weights up
to float summation order. Stated tolerance: weights within 1e-5 (measured: ~1.5e-8), logged
losses and gradient norms within 1e-5 relative.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_fixtures import OutputDtype, child_env
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from wandb_log import history

import rfkit
from rfkit.cli import main
from rfkit.ema import PREFIX, split_state_dict
from rfkit.models import DiT
from rfkit.parallel import parallelize

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model.model.init_args.width=32",
    "--model.model.init_args.depth=2",
    "--data.init_args.global_batch_size=64",
    "--data.init_args.batches_per_epoch=6",
    "--model.sample_steps=2",
    "--trainer.val_check_interval=3",
    "--trainer.log_every_n_steps=2",
    "--trainer.enable_progress_bar=false",
]
ONE_PROCESS = ["--trainer.devices=1", "--trainer.strategy=auto"]


def run(config: str, run_dir: Path, *extra: str, processes: int = 2) -> None:
    """``rfkit fit``: in this process for 1 device, else as a real command that launches its ranks."""
    args = ["fit", f"--config={ROOT / 'configs' / config}", f"--trainer.default_root_dir={run_dir}", *TINY, *extra]
    if processes == 1:
        main([*args, *ONE_PROCESS])
        return
    done = subprocess.run([sys.executable, "-m", "rfkit.cli", *args], env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def weights(path: Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    if path.is_dir():  # a sharded (FSDP2) checkpoint: assemble it
        full = path.parent / f"{path.name}.pt"
        dcp_to_torch_save(path, full)
        path = full
    return torch.load(path, weights_only=True)[key]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def logged(run_dir: Path, key: str) -> list[float]:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return [float(row[key]) for run in runs for row in history(run) if key in row]


def test_ddp_matches_one_process_and_all_ranks_skip_a_fault_on_one(tmp_path):
    # step 3 has a NaN loss on the last rank only; with skip_nonfinite every rank drops that update
    fault = ["--model.weighting=scale_fixtures.NaNOnLastRank", "--model.weighting.call=3"]
    args = ["--trainer.max_steps=6", *fault, "--model.skip_nonfinite=true"]
    run("digits_ddp.yaml", tmp_path / "one", *args, processes=1)
    run("digits_ddp.yaml", tmp_path / "ddp", *args)
    one, ddp = tmp_path / "one/checkpoints/last.ckpt", tmp_path / "ddp/checkpoints/last.ckpt"
    assert_same_weights(weights(ddp), weights(one))  # the trained weights and their EMA (ema/<name>)
    assert any(k.startswith(PREFIX) for k in weights(one))
    for path in (one, ddp):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["global_step"] == 6 and ckpt["rfkit"]["skipped_steps"] == 1
    for key in ("train/loss", "train/grad_norm", "train/skipped_steps"):
        torch.testing.assert_close(logged(tmp_path / "ddp", key), logged(tmp_path / "one", key), rtol=1e-5, atol=0)
    assert logged(tmp_path / "ddp", "train/skipped_steps") == [0.0, 1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "ddp/samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]


def test_one_two_and_four_processes_and_accumulation_train_alike(tmp_path):
    # the same 64-row global batch as 1 x 64, 4 ranks x 16, and 1 process x 2 micro-batches of 32: noise, t and
    # label drops follow the global row (rfkit.draws), so the weights agree (the 2-rank case is the test above)
    independent = ["--trainer.max_steps=4", "--model.coupling=Independent"]
    run("digits_ddp.yaml", tmp_path / "one", *independent, processes=1)
    run("digits_ddp.yaml", tmp_path / "four", *independent, "--trainer.devices=4")
    run("digits_ddp.yaml", tmp_path / "accumulate", *independent, "--trainer.accumulate_grad_batches=2", processes=1)
    reference = weights(tmp_path / "one/checkpoints/last.ckpt")
    assert_same_weights(weights(tmp_path / "four/checkpoints/last.ckpt"), reference)  # measured: 7e-11 apart
    # accumulation sums two 32-row means where one process takes one 64-row mean: the same numbers in another
    # rounding order, which Adam's normalisation magnifies on parameters with near-zero gradients (measured:
    # 3e-5 after 4 steps). Different draws would put them about a learning-rate step apart.
    assert_same_weights(weights(tmp_path / "accumulate/checkpoints/last.ckpt"), reference, atol=1e-4)


def test_fsdp2_matches_one_process_and_its_sharded_checkpoint_resumes(tmp_path):
    every2 = ["--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1"]
    run("digits_fsdp.yaml", tmp_path / "one", "--trainer.max_steps=6", *every2, processes=1)
    run("digits_fsdp.yaml", tmp_path / "fsdp", "--trainer.max_steps=4", *every2)
    ckpts = tmp_path / "fsdp/checkpoints"
    assert (ckpts / "epoch=0-step=4.ckpt/.metadata").is_file()  # a folder of shards, one per rank
    assert len(list((ckpts / "epoch=0-step=4.ckpt").glob("*.distcp"))) == 2
    assert not list(ckpts.glob("*.partial"))
    reference = tmp_path / "one/checkpoints"
    assert_same_weights(weights(ckpts / "epoch=0-step=4.ckpt"), weights(reference / "epoch=0-step=4.ckpt"))
    # the same command again resumes from the last complete (sharded) checkpoint and the same W&B run
    run("digits_fsdp.yaml", tmp_path / "fsdp", "--trainer.max_steps=6", *every2)
    assert_same_weights(weights(ckpts / "last.ckpt"), weights(reference / "last.ckpt"))
    assert torch.load(ckpts / "last.ckpt/meta.pt", weights_only=True)["global_step"] == 6
    # the EMA (rfkit.ema.EMA) is in the shards too, and agrees with one process's (compared above with the weights)
    assert any(k.startswith(PREFIX) for k in weights(ckpts / "last.ckpt"))
    flow = rfkit.load_checkpoint(ckpts / "last.ckpt")  # a sharded folder loads like a file, for sampling: EMA weights
    trained, averages = split_state_dict(weights(reference / "last.ckpt"))
    assert_same_weights(flow.state_dict(), {**trained, **averages}, atol=1e-5)
    runs = sorted((tmp_path / "fsdp/wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    # the gradient norm of sharded (DTensor) gradients is the full norm
    for key in ("train/loss", "train/grad_norm"):
        torch.testing.assert_close(logged(tmp_path / "fsdp", key), logged(tmp_path / "one", key), rtol=1e-5, atol=0)


def test_bf16_mixed_precision_trains(tmp_path):
    OutputDtype.seen.clear()
    main(
        [
            "fit",
            f"--config={ROOT / 'configs/toy2d.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=3",
            "--data.init_args.val_size=64",
            "--model.sample_steps=2",
            "--trainer.precision=bf16-mixed",
            "--trainer.callbacks+=scale_fixtures.OutputDtype",
        ]
    )
    assert set(OutputDtype.seen) == {torch.bfloat16}  # autocast was on: the model computed in bf16
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())


def test_activation_checkpointing_and_compile_keep_names_and_values():
    torch.manual_seed(0)
    plain = DiT(in_channels=1, input_size=8, width=32, depth=2, heads=2, num_classes=10)
    checkpointed = DiT(in_channels=1, input_size=8, width=32, depth=2, heads=2, num_classes=10)
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(checkpointed, activation_checkpointing=True)
    x, t, cond = torch.randn(4, 1, 8, 8), torch.rand(4), {"cls": torch.arange(4)}
    for model in (plain, checkpointed):
        model(x, t, cond).square().mean().backward()
    for (name, p), (name2, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert name == name2
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    # compiling is lazy (the first call compiles, ~45 s for this model on a 2-core CPU): check the wiring
    compiled = parallelize(DiT(in_channels=1, input_size=8, width=32, depth=2, heads=2, num_classes=10), compile=True)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--data.init_args.global_batch_size=33", "--trainer.accumulate_grad_batches=2"], "try 32"),
        (["--trainer.max_steps=many"], "wrong type for 'trainer.max_steps': expected int, got 'many'"),
        (["--model.sample_shift=0"], "model.sample_shift must be > 0"),
        (
            ["--model.timesteps=Shifted", "--model.timesteps.base=Uniform", "--model.timesteps.shift=-1"],
            "model.timesteps (rfkit.timesteps.Shifted): shift must be > 0",
        ),
    ],
)
def test_config_errors_name_the_key(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={ROOT / 'configs/digits_ddp.yaml'}", *ONE_PROCESS, *args])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err
