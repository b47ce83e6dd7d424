"""The SD3 adapter with LoRA on 2 real CPU processes (gloo): DDP, and FSDP2 sharding every transformer
block with activation checkpointing (configs/sd3_lora.yaml's setting). Both train the same adapters
from the same global rows (rfkit.draws), FSDP2's sharded checkpoints hold only the adapters, and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from pretrained_fixtures import SD3_LORA_TINY, SD3_TINY, write_sd3_shards
from scale_fixtures import child_env

from rfkit.checkpoint import load_checkpoint, read_checkpoint
from rfkit.models.pretrained import SD3Transformer
from rfkit.models.pretrained.lora import weights_sha256

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sd3_lora.yaml"
FSDP2 = json.dumps({"class_path": "rfkit.strategies.FSDP2"})


def fit(run_dir: Path, data: Path, strategy: str, steps: int, *extra: str) -> None:
    """`rfkit fit --config configs/sd3_lora.yaml` on the tiny SD3, 2 processes, as a real command."""
    args = ["fit", f"--config={CONFIG}", f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0", "--model.lr_scheduler=null", "--trainer.devices=2",
            "--trainer.accelerator=cpu", f"--trainer.strategy={strategy}", "--trainer.enable_progress_bar=false",
            *(a.format(data=data) for a in SD3_LORA_TINY), *extra]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "rfkit.cli", *args], env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def adapters(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state (a file, or FSDP2's folder of shards), checked to hold the adapters alone."""
    state = read_checkpoint(ckpt)["state_dict"]
    assert {k for k in state if "lora_" not in k} == {"model.base_sha256_bytes"}
    base = SD3Transformer(config=SD3_TINY, latent_size=8).transformer
    assert bytes(state["model.base_sha256_bytes"].tolist()).hex() == weights_sha256(base)
    return {k: v for k, v in state.items() if "lora_" in k}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd3_ddp")
    data = write_sd3_shards(root / "data")
    fit(root / "run", data, "ddp", 3)
    return root / "run", data


@pytest.mark.slow  # several minutes of 2-process runs: tools/test.sh -m slow
def test_lora_under_ddp(ddp_run):
    run, _ = ddp_run
    trained = adapters(run / "checkpoints/last.ckpt")
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in trained.items())
    module = load_checkpoint(run / "checkpoints/last.ckpt")  # base from the config, adapters from the file
    for name, value in module.state_dict().items():
        if "lora_" in name:
            assert torch.equal(value, trained[name])


@pytest.mark.slow  # several minutes of 2-process runs: tools/test.sh -m slow
def test_lora_under_fsdp2_trains_like_ddp_and_resumes(ddp_run, tmp_path):
    ddp, data = ddp_run
    fit(tmp_path, data, FSDP2, 3)
    ckpt = tmp_path / "checkpoints/last.ckpt"
    assert (ckpt / ".metadata").is_file()  # sharded: one file per rank
    sharded, replicated = adapters(ckpt), adapters(ddp / "checkpoints/last.ckpt")
    assert sharded.keys() == replicated.keys()
    for k in sharded:  # the same rows, the same steps: the same adapters, up to summation order
        torch.testing.assert_close(sharded[k], replicated[k], rtol=0, atol=1e-5, msg=k)
    fit(tmp_path, data, FSDP2, 4)  # the same command, one step longer: resumes from the sharded checkpoint
    assert read_checkpoint(ckpt)["global_step"] == 4
    assert any(not torch.equal(v, sharded[k]) for k, v in adapters(ckpt).items())


@pytest.mark.slow  # two 2-process runs, ~45 s: tools/test.sh -m slow
def test_meanflow_with_a_second_time_under_fsdp2_trains_like_ddp(ddp_run, tmp_path):
    """MeanFlow's JVP through the FSDP2-sharded SD3 (blocks gathered in forward hooks) with r_embed on the root."""
    _, data = ddp_run
    meanflow = ("--model.objective=MeanFlow", "--model.objective.ratio=1.0", "--model.activation_checkpointing=false",
                "--model.model.init_args.second_time=true")  # fmt: skip
    fit(tmp_path / "ddp", data, "ddp", 2, *meanflow)
    fit(tmp_path / "fsdp", data, FSDP2, 2, *meanflow)
    sharded = read_checkpoint(tmp_path / "fsdp/checkpoints/last.ckpt")["state_dict"]
    replicated = read_checkpoint(tmp_path / "ddp/checkpoints/last.ckpt")["state_dict"]
    assert sharded.keys() == replicated.keys()
    assert sum(k.startswith("model.r_embed.") for k in sharded) == 4
    assert sharded["model.r_embed.mlp.2.weight"].abs().sum() > 0  # trained from its zero init
    for k in sharded:
        torch.testing.assert_close(sharded[k], replicated[k], rtol=0, atol=1e-5, msg=k)
