"""Quality metrics: exact W2 against POT, the digits Frechet distance and its feature network."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from rfkit.data import Digits
from rfkit.metrics import DigitsFeatures, LossMeter, Wasserstein2, digits_fid


def test_w2_of_a_translation_is_its_length():
    a = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    w2 = Wasserstein2()
    w2.update(a, real=True)
    w2.update(a + torch.tensor([3.0, 4.0]), real=False)
    assert float(w2.compute()) == pytest.approx(5.0, rel=1e-9)


def test_w2_matches_pot():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) * 2 + 1
    w2 = Wasserstein2()
    w2.update(a, real=True)
    w2.update(b, real=False)
    m = ot.dist(b.double().numpy(), a.double().numpy())
    u = np.full(300, 1 / 300)
    assert float(w2.compute()) == pytest.approx(np.sqrt(ot.emd2(u, u, m)), rel=1e-7)
    with pytest.raises(ValueError, match="both"):
        Wasserstein2().compute()


def test_digits_features_classify_held_out_digits():
    data = Digits(seed=0)
    data.setup()
    model = DigitsFeatures.pretrained()
    acc = (model.logits(data.val_set["latent"]).argmax(1) == data.val_set["cls"]).float().mean()
    assert acc > 0.95
    assert model(data.val_set["latent"]).shape == (180, DigitsFeatures.num_features)


def test_digits_fid_separates_real_from_degraded():
    data = Digits(seed=0)
    data.setup()
    x = data.train_set["latent"]
    scores = {}
    for name, fake in {
        "real": x[800:1600],
        "noisy": (x[800:1600] + 0.3 * torch.randn(800, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(
            -1, 1
        ),
        "noise": torch.randn(800, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1),
    }.items():
        fid = digits_fid()
        fid.update(x[:800], real=True)
        fid.update(fake, real=False)
        scores[name] = float(fid.compute())
    assert scores["real"] < 5 < scores["noisy"] < scores["noise"]


def test_loss_meter():
    m = LossMeter(4)
    with pytest.raises(ValueError, match="before any update"):
        m.read()
    m.update(torch.tensor(2.0), torch.tensor([0.1, 0.2, 0.6]), torch.tensor([1.0, 3.0, 5.0]))
    m.update(torch.tensor(4.0), torch.tensor([0.99]), torch.tensor([7.0]))
    loss, bins = m.read()
    assert loss == 3.0  # mean of the step losses
    assert bins[0] == 2.0 and torch.isnan(bins[1]) and bins[2] == 5.0 and bins[3] == 7.0
    assert m.edges() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # a read starts a new window; the reduce function sees the raw sums (what ranks all-reduce)
    m.update(torch.tensor(1.0), torch.tensor([0.3]), torch.tensor([1.0]))
    loss, bins = m.read(lambda state: state * 2)  # two identical ranks
    assert loss == 1.0 and bins[1] == 1.0
