"""A coupling rfkit does not ship: exact minibatch OT within each class label."""

from __future__ import annotations

import torch

from rfkit.couplings import Coupling, check_pair
from rfkit.ot import exact_assignment


class WithinClassOT(Coupling):
    """Exact minibatch OT inside each class: noise changes hands only between samples of one label.

    For each label ``c`` of ``cond["cls"]``, with ``J_c = {j : cls_j = c}``, the noise rows of
    ``J_c`` are permuted among themselves to solve::

        min_pi  sum_{j in J_c} ||x0[pi(j)] - x1[j]||^2

    (rfkit's exact assignment, block by block). This is the optimal permutation for the squared
    Euclidean cost made infinite between classes. ``x1`` and its labels never move.

    Why: a class-conditional flow samples class ``c`` from ``x0 ~ N(0, I)``. OT over the whole
    batch hands class ``c`` the noise rows nearest its data, so during training ``p(x0 | c)`` is no
    longer ``N(0, I)`` and the learned map of class ``c`` starts from the wrong distribution. The
    noise rows of one class's positions are an i.i.d. ``N(0, I)`` sample, so permuting within the
    class keeps ``p(x0 | c) = N(0, I)`` while still straightening the paths of each class.

    It reads the labels from the batch's conditioning (``cond["cls"]``, (n,) integers), which
    rfkit passes to every coupling; a batch without labels is refused.
    """

    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        labels = None if cond is None else cond.get("cls")
        if labels is None:
            raise ValueError(
                "WithinClassOT pairs noise within class labels and this batch has no cond['cls']: "
                "train on a labelled dataset (e.g. rfkit.data.Digits) or use MinibatchOT"
            )
        if labels.shape != x1.shape[:1]:
            raise ValueError(
                f"cond['cls'] must hold one label per sample, shape ({x1.shape[0]},), got {tuple(labels.shape)}"
            )
        labels = labels.to(x0.device)
        perm = torch.arange(x0.shape[0], device=x0.device)
        for c in labels.unique():
            rows = (labels == c).nonzero().squeeze(1)  # (n_c,) positions of class c
            if rows.numel() > 1:
                perm[rows] = rows[exact_assignment(x0[rows], x1[rows])]
        return x0[perm], x1
