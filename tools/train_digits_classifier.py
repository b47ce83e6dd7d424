"""Trains the digits classifier whose features define rfkit's FID-like score on digits.

    python tools/train_digits_classifier.py        # writes rfkit/assets/digits_classifier.pt

Trained on the training split of rfkit.data.Digits (seed 0) only, so the held-out split measures it.
Deterministic: seeded, full-batch Adam on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rfkit.data import Digits
from rfkit.metrics import DIGITS_WEIGHTS, DigitsFeatures


def main(steps: int = 600) -> None:
    torch.manual_seed(0)
    data = Digits(seed=0)
    data.setup()
    x, y = data.train_set["latent"], data.train_set["cls"]
    model = DigitsFeatures()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for step in range(steps):
        # small pixel noise: the features must also be sensible on imperfect generated digits
        noisy = x + 0.1 * torch.randn_like(x)
        loss = F.cross_entropy(model.logits(noisy), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model.logits(data.val_set["latent"]).argmax(1) == data.val_set["cls"]).float().mean()
    print(f"held-out accuracy {acc.item():.4f} on {len(data.val_set['cls'])} images")
    DIGITS_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), DIGITS_WEIGHTS)
    print(f"wrote {DIGITS_WEIGHTS}")


if __name__ == "__main__":
    main()
