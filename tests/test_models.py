"""Velocity networks: shapes, adaLN-Zero identity at init, conditioning and its null value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rfkit.models import MLP, DiT, MMDiT
from rfkit.models.dit import DiTBlock
from rfkit.models.layers import sincos_2d


def small_dit(**kw) -> DiT:
    args = dict(in_channels=2, input_size=8, patch_size=2, width=32, depth=2, heads=4, num_classes=10)
    return DiT(**{**args, **kw})


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Replace the zero initialisation so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_dit_forward_backward_shapes():
    model = small_dit()
    x, t, y = torch.randn(5, 2, 8, 8), torch.rand(5), torch.randint(0, 10, (5,))
    out = model(x, t, {"cls": y})
    assert out.shape == x.shape
    (out - torch.randn_like(out)).square().sum().backward()
    assert model.final.proj.weight.grad is not None and model.final.proj.weight.grad.abs().sum() > 0
    assert model.num_tokens((2, 8, 8)) == 16
    assert model.latent_shape == (2, 8, 8)


def test_adaln_zero_starts_as_identity():
    model = small_dit()
    x = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        torch.testing.assert_close(block(x, c), x)
    out = model(torch.randn(3, 2, 8, 8), torch.rand(3), {"cls": torch.zeros(3, dtype=torch.long)})
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final projection
    # once trained (here: randomised) a block is no longer the identity
    randomise(model.blocks[0])
    assert not torch.allclose(model.blocks[0](x, c), x)


def test_dit_uses_time_class_and_position():
    model = small_dit()
    randomise(model)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 0.3])
    base = model(x, t, {"cls": torch.tensor([1, 1])})
    assert not torch.allclose(base, model(x, t + 0.2, {"cls": torch.tensor([1, 1])}))
    assert not torch.allclose(base, model(x, t, {"cls": torch.tensor([2, 2])}))
    null = model.drop_condition({"cls": torch.tensor([1, 1])}, torch.tensor([True, False]))
    assert null["cls"].tolist() == [10, 1]
    # shape buckets: any side divisible by the patch runs through the same weights
    assert model(torch.randn(2, 2, 8, 12), t, {"cls": torch.tensor([1, 1])}).shape == (2, 2, 8, 12)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(2, 2, 7, 8), t, {"cls": torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="needs class labels"):
        model(x, t, {})


def test_sincos_positions():
    pos = sincos_2d(8, 2, 3)
    assert pos.shape == (6, 8)
    # position (0, 0): sin parts 0, cos parts 1, for both axes
    torch.testing.assert_close(pos[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.float32))
    assert len({tuple(r.tolist()) for r in pos}) == 6  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)


def test_qk_norm_switch():
    assert isinstance(small_dit(qk_norm=True).blocks[0].stream.qkv.q_norm, nn.RMSNorm)
    assert isinstance(small_dit(qk_norm=False).blocks[0].stream.qkv.q_norm, nn.Identity)


def test_mmdit_joint_attention_reads_text():
    model = MMDiT(in_channels=4, input_size=8, text_dim=12, pooled_dim=6, width=32, depth=2, heads=4)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = {"text": torch.randn(2, 5, 12), "pooled": torch.randn(2, 6)}
    out = model(x, t, cond)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    randomise(model)
    base = model(x, t, cond)
    # the per-token text reaches the image only through the joint attention
    other_text = {"text": torch.randn(2, 5, 12), "pooled": cond["pooled"]}
    assert not torch.allclose(base, model(x, t, other_text))
    # separate weights per modality
    block = model.blocks[0]
    assert block.text.qkv.qkv.weight.data_ptr() != block.image.qkv.qkv.weight.data_ptr()
    dropped = model.drop_condition(cond, torch.tensor([True, False]))
    assert dropped["text"][0].abs().sum() == 0 and torch.equal(dropped["text"][1], cond["text"][1])
    assert dropped["pooled"][0].abs().sum() == 0
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, {"text": cond["text"]})


def test_mlp_is_torchcfm_network():
    model = MLP(dim=2, width=64)
    layers = [model.inp, *model.body]
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "SELU", "Linear", "SELU", "Linear", "SELU", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [
        (3, 64),
        (64, 64),
        (64, 64),
        (64, 2),
    ]
    x, t = torch.randn(4, 2), torch.rand(4)
    manual = model.body(model.inp(torch.cat([x, t[:, None]], 1)))
    torch.testing.assert_close(model(x, t, {}), manual)
    cond_model = MLP(num_classes=3)
    assert cond_model.drop_condition({"cls": torch.tensor([0, 2])}, torch.tensor([True, False]))["cls"].tolist() == [
        3,
        2,
    ]


def test_the_null_label_lives_in_the_label_embedding():
    from rfkit.models import MLP, DiT
    from rfkit.models.layers import LabelEmbedding

    embed = LabelEmbedding(3, 4)
    assert embed.weight.shape == (4, 4)  # three classes and the null one
    dropped = embed.drop(torch.tensor([0, 1, 2]), torch.tensor([True, False, True]))
    assert dropped.tolist() == [3, 1, 3]
    for model in (MLP(num_classes=3), DiT(in_channels=1, input_size=4, width=32, depth=1, heads=2, num_classes=3)):
        cond = model.drop_condition({"cls": torch.tensor([0, 2])}, torch.tensor([False, True]))
        assert cond["cls"].tolist() == [0, 3]
        assert "y_embed.weight" in model.state_dict()  # checkpoints from before keep loading


@pytest.mark.parametrize("name", ["DiT", "MMDiT"])
def test_every_parameter_gets_a_gradient(name):
    """DDP refuses a model with parameters outside the graph (MMDiT's last text stream once was)."""
    from rfkit.models import DiT, MMDiT

    torch.manual_seed(0)
    if name == "DiT":
        model, cond = (
            DiT(in_channels=2, input_size=4, width=32, depth=2, heads=2, num_classes=3),
            {"cls": torch.tensor([0, 2])},
        )
    else:
        model = MMDiT(in_channels=2, input_size=4, text_dim=8, pooled_dim=8, width=32, depth=2, heads=2)
        cond = {"text": torch.randn(2, 3, 8), "pooled": torch.randn(2, 8)}
    model(torch.randn(2, 2, 4, 4), torch.rand(2), cond).square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


SECOND_TIME = {
    "MLP": (lambda st: MLP(dim=3, width=16, num_classes=4, second_time=st), (5, 3), {"cls": torch.arange(5) % 4}),
    "DiT": (lambda st: small_dit(second_time=st), (5, 2, 8, 8), {"cls": torch.arange(5)}),
    "MMDiT": (
        lambda st: MMDiT(
            in_channels=2, input_size=8, text_dim=12, pooled_dim=6, width=32, depth=1, heads=4, second_time=st
        ),
        (5, 2, 8, 8),
        {"text": torch.randn(5, 3, 12), "pooled": torch.randn(5, 6)},
    ),
}


@pytest.mark.parametrize("name", SECOND_TIME)
def test_second_time_starts_ignored_and_a_flow_matching_checkpoint_initialises_it(name, tmp_path):
    make, shape, cond = SECOND_TIME[name]
    plain = make(False)
    randomise(plain)
    assert not any("r_embed" in k for k in plain.state_dict())
    x, t, r = torch.randn(shape), torch.rand(5), torch.rand(5)
    with pytest.raises(ValueError, match="second_time=True"):
        plain(x, t, cond, r)
    # a flow-matching run's checkpoint, loaded the way InitFromCheckpoint does (rfkit fit writes this layout)
    from types import SimpleNamespace

    from rfkit.callbacks import InitFromCheckpoint

    path = tmp_path / "fm.ckpt"
    state = {f"model.{k}": v for k, v in plain.state_dict().items()}
    torch.save({"rfkit": {}, "state_dict": state, "hyper_parameters": {"model": {}}}, path)
    second = make(True)
    InitFromCheckpoint(str(path)).on_fit_start(
        SimpleNamespace(ckpt_path=None, global_step=0), SimpleNamespace(model=second)
    )
    v = plain(x, t, cond)
    assert torch.equal(second(x, t, cond), v) and torch.equal(second(x, t, cond, r), v)
    assert torch.equal(second(x, t, cond, torch.zeros(5)), v)
    # the embedding is wired in: once its output layer moves, r changes the output, and None means r = 0
    randomise(second, seed=3)
    assert not torch.allclose(second(x, t, cond, r), second(x, t, cond))
    torch.testing.assert_close(second(x, t, cond, torch.zeros(5)), second(x, t, cond))
    # a checkpoint that does not fit is still refused
    broken = {
        k: v
        for k, v in state.items()
        if "r_embed" not in k and not k.endswith("inp.weight") and "patches.embed.weight" not in k
    }
    torch.save({"rfkit": {}, "state_dict": broken, "hyper_parameters": {"model": {}}}, path)
    with pytest.raises(ValueError, match="does not fit"):
        InitFromCheckpoint(str(path)).on_fit_start(
            SimpleNamespace(ckpt_path=None, global_step=0), SimpleNamespace(model=make(True))
        )
