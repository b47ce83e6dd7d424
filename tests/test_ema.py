"""rfkit.ema.EMA in one process: the update rule in closed form, the same average as Lightning's
EMAWeightAveraging on a real run, ``swapped``, frozen parameters left out, and a checkpoint file
that resumes the average. (FSDP2 on real gloo processes and kill -9: tests/test_ema_fsdp.py.)"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from rfkit.checkpoint import read_checkpoint
from rfkit.data import Digits
from rfkit.ema import EMA, PREFIX, find_ema
from rfkit.models import DiT
from rfkit.module import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]


class Climb(pl.LightningModule):
    """One trained weight that SGD(lr=1) raises by exactly 1 per step (loss = -w), and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5]))
        self.frozen = nn.Parameter(torch.tensor([7.0]), requires_grad=False)

    def training_step(self, batch, batch_idx):
        return -self.w.sum() + 0 * batch.sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=1.0)


def trainer(tmp_path, callbacks, max_steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )  # fmt: skip


def test_update_rule_in_closed_form(tmp_path):
    # after step index i the weight is 0.5 + (i + 1); updates at i >= 3 with i % 2 == 0: i = 4, 6, 8
    decay = 0.9
    ema = EMA(decay=decay, update_every=2, start_step=3)
    module = Climb()
    trainer(tmp_path, [ema], max_steps=9, enable_checkpointing=False).fit(module)
    assert find_ema(module.trainer) is ema and module.trainer.global_step == 9
    expected = 0.5 + 5  # the first update copies the weight
    for i in (6, 8):
        expected = decay * expected + (1 - decay) * (0.5 + i + 1)
    assert ema.updates == 3 and ema.names == ["w"]  # the frozen parameter is not averaged
    torch.testing.assert_close(ema.average[0], torch.tensor([expected], dtype=torch.float32), rtol=1e-6, atol=0)
    assert module.w.item() == 9.5  # training ended with the trained weight in place (not the average)
    with ema.swapped(module):
        assert torch.equal(module.w.detach(), ema.params[0].detach()) and module.w.item() != 9.5
        torch.testing.assert_close(module.w.detach(), torch.tensor([expected]), rtol=1e-6, atol=0)
    assert module.w.item() == 9.5 and module.frozen.item() == 7.0


def test_same_average_as_lightning_ema_on_a_real_run(tmp_path):
    # an independent implementation: Lightning's AveragedModel with get_ema_avg_fn, same step rule
    torch.manual_seed(0)
    flow = RectifiedFlow(DiT(in_channels=1, input_size=8, width=32, depth=1, heads=2, num_classes=10))
    ours = EMA(decay=0.8, update_every=2, start_step=1)
    theirs = EMAWeightAveraging(decay=0.8, update_every_n_steps=2, update_starting_at_step=1, use_buffers=False)
    data = Digits(batch_size=16, batches_per_epoch=7)
    trainer(tmp_path, [ours, theirs], max_steps=7, limit_val_batches=0, enable_checkpointing=False).fit(flow, data)
    reference = dict(theirs._average_model.module.named_parameters())
    assert ours.updates == 3 and len(ours.names) == len(reference)
    for name, a in zip(ours.names, ours.average, strict=True):  # lerp against mul-add: float rounding apart
        torch.testing.assert_close(a, reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_file_holds_the_average_and_resumes_it(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.5)
    module = Climb()
    trainer(tmp_path, [ema], max_steps=4).fit(module)
    path = tmp_path / "last.ckpt"
    module.trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"w", "frozen", f"{PREFIX}w"}
    assert torch.equal(raw["state_dict"][f"{PREFIX}w"], ema.average[0])
    # resumed in a new trainer: the average continues from the saved one (and the weights from theirs)
    resumed_ema, resumed = EMA(decay=0.5), Climb()
    trainer(tmp_path, [resumed_ema], max_steps=6).fit(resumed, ckpt_path=path)
    reference_ema, reference = EMA(decay=0.5), Climb()
    trainer(tmp_path / "ref", [reference_ema], max_steps=6).fit(reference)
    assert resumed_ema.updates == reference_ema.updates == 6
    assert torch.equal(resumed_ema.average[0], reference_ema.average[0]) and torch.equal(resumed.w, reference.w)


def test_read_checkpoint_hands_out_the_average(tmp_path):
    from rfkit.cli import main

    main(
        ["fit", f"--config={ROOT / 'configs/digits_fsdp.yaml'}", "--trainer.devices=1", "--trainer.strategy=auto",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3", "--model.model.init_args.width=32",
         "--model.model.init_args.depth=1", "--data.init_args.global_batch_size=16", "--model.sample_steps=2",
         "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    path = tmp_path / "checkpoints/last.ckpt"
    raw = torch.load(path, weights_only=True)["state_dict"]
    ckpt = read_checkpoint(path)
    assert not any(k.startswith(PREFIX) for k in ckpt["state_dict"])
    name = "model.final.proj.weight"
    assert torch.equal(ckpt["state_dict"][name], raw[PREFIX + name])
    assert torch.equal(ckpt["current_model_state"][name], raw[name])
    assert not torch.equal(raw[name], raw[PREFIX + name])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay must lie in"):
        EMA(decay=1.5)
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        EMA(update_every=0)


def test_a_checkpoint_saved_while_swapped_keeps_trained_and_average_apart(tmp_path):
    # SIGTERM mid-validation saves with the average swapped in: the file must not mix them up
    ema = EMA(decay=0.5)
    module = Climb()
    trainer(tmp_path, [ema], max_steps=3).fit(module)
    with ema.swapped(module):
        module.trainer.save_checkpoint(tmp_path / "swapped.ckpt")
    module.trainer.save_checkpoint(tmp_path / "plain.ckpt")
    swapped, plain = (torch.load(tmp_path / f"{n}.ckpt", weights_only=True)["state_dict"] for n in ("swapped", "plain"))
    assert swapped.keys() == plain.keys() and all(torch.equal(swapped[k], plain[k]) for k in plain)
    assert plain["w"].item() == 3.5 and plain[f"{PREFIX}w"].item() != 3.5


@pytest.mark.parametrize("callback", ["lightning", "rfkit-full-file"])
def test_fsdp2_refuses_an_unsharded_ema_and_a_full_file_checkpoint(tmp_path, callback):
    from rfkit.strategies import FSDP2

    ema = EMAWeightAveraging() if callback == "lightning" else EMA()
    strategy = FSDP2(save_distributed_checkpoint=callback == "lightning")
    flow = RectifiedFlow(DiT(in_channels=1, input_size=8, width=32, depth=1, heads=2, num_classes=10))
    expected = "replace it in trainer.callbacks by rfkit.ema.EMA" if callback == "lightning" else "save_distributed"
    try:
        with pytest.raises(ValueError, match=expected):
            trainer(tmp_path, [ema], max_steps=1, devices=1, strategy=strategy).fit(flow, Digits(batch_size=8))
    finally:  # the 1-rank process group the strategy started must not leak into later tests
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_lightning_ema_still_leaves_the_trained_weights_in_the_last_checkpoint(tmp_path):
    # the configs moved to rfkit.ema.EMA; Lightning's EMAWeightAveraging (no FSDP2) stays supported:
    # it copies the average into the model when training ends, and rfkit.resume.Resume keeps the trained
    # weights for the last.ckpt written after that
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rfkit.resume import Resume

    torch.manual_seed(0)
    flow = RectifiedFlow(DiT(in_channels=1, input_size=8, width=32, depth=1, heads=2, num_classes=10))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)
    callbacks = [EMAWeightAveraging(decay=0.5), Resume(), checkpoints]
    trainer(tmp_path, callbacks, max_steps=3, limit_val_batches=0).fit(flow, Digits(batch_size=16, batches_per_epoch=5))
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    key = "model.final.proj.weight"
    assert torch.equal(ckpt["state_dict"][key], flow.state_dict()[key])  # the average, copied into the model
    assert not torch.equal(ckpt["current_model_state"][key], ckpt["state_dict"][key])  # the trained weights
