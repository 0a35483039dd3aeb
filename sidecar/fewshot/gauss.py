"""Relative Mahalanobis distance: how far a vector is from its nearest label's Gaussian,
less how far it is from the Gaussian of all the examples together.

Each label is a Gaussian with its own mean and a covariance shared by all labels (shrunk
towards a multiple of the identity, so a small set of examples in many dimensions still
has an inverse); the background is one Gaussian over every example. Subtracting the
background distance removes what makes a text far from everything in directions the
examples never vary in (Ren et al., 2021, "A simple fix to Mahalanobis distance"); it was
the strongest single out-of-scope signal among the confident answers on Banking77 (see
`novelty`). Distances are squared norms after whitening, so a query costs two
matrix-vector products.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
SHRINK = 0.1  # share of the covariance replaced by its average variance on the diagonal


def whitener(cov: F64) -> F64:
    """W with ||W (x - m)||^2 the Mahalanobis distance under `cov` (shrunk)."""
    d = cov.shape[0]
    # A floor on the average variance: identical (or zero) vectors still whiten.
    average = max(float(np.trace(cov)) / d, 1e-6)
    shrunk = (1 - SHRINK) * cov + SHRINK * average * np.eye(d)
    out: F64 = np.linalg.cholesky(np.linalg.inv(shrunk)).T
    return out


class Gaussians:
    def __init__(self, vectors: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> None:
        v = vectors.astype(np.float64)
        n_labels = int(y.max()) + 1
        self.counts = np.bincount(y, minlength=n_labels)
        means = np.zeros((n_labels, v.shape[1]))
        np.add.at(means, y, v)
        means /= np.maximum(self.counts, 1)[:, None]
        resid = v - means[y]
        self.w = whitener(resid.T @ resid / len(v))
        self.means = means @ self.w.T
        centre = v.mean(axis=0)
        self.w0 = whitener((v - centre).T @ (v - centre) / len(v))
        self.centre = self.w0 @ centre

    def relative(self, x: npt.NDArray[np.float32], own: int | None = None) -> float:
        """min over labels of the distance to the label, less the background distance.

        own: the label of an example judged by the others (its own label's mean without it
        lies n/(n-1) times as far from it: exact for the mean, the covariance is kept)."""
        z = self.w @ x.astype(np.float64)
        d = ((self.means - z) ** 2).sum(axis=1)
        if own is not None:
            n = int(self.counts[own])
            d[own] = d[own] * (n / (n - 1)) ** 2 if n > 1 else np.inf
        d0 = float(((self.w0 @ x.astype(np.float64) - self.centre) ** 2).sum())
        return float(d.min()) - d0
