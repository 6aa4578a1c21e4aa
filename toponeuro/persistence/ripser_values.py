"""ripser.py backend: death values only (ripser.py gives no H0 generators).

It serves to validate the values that the edge-giving backends produce. It
computes in float32, so its values match the others to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from ripser import ripser

from .._validation import refuse_beyond_float32


def death_values(D: torch.Tensor) -> torch.Tensor:
    """(n, n) dissimilarity -> (n - 1,) finite deaths, unsorted."""
    X = D.detach().cpu().double().numpy()
    refuse_beyond_float32(X, "ripser")  # ripser.py computes in float32
    dgm = ripser(X, distance_matrix=True, maxdim=0)["dgms"][0]
    finite = dgm[np.isfinite(dgm[:, 1]), 1]
    # ripser reports no pair of zero persistence (duplicated neurons): those
    # components die at 0
    finite = np.concatenate([np.zeros(X.shape[0] - 1 - len(finite)), finite])
    return torch.from_numpy(finite)
