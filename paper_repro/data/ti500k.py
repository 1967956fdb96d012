"""Carmon et al.'s 500K pseudo-labelled Tiny Images (AFT(+500K)'s extra pre-training data)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from paper_repro.data.registry import EXTRA_DATA, check_arrays, one_line
from paper_repro.errors import DataError



def load_ti500k(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ti_500K_pseudo_labeled.pickle: images uint8 [N, 3, 32, 32] and int64 labels [N].

    The file is a dict with 'data' uint8 (N, 32, 32, 3) HWC and 'extrapolated_targets' (N ints in
    0-9) (ecosystem.md §D.4). CHW (N, 3, 32, 32) is accepted too, as the published scripts emit it.
    """
    hint = "download ti_500K_pseudo_labeled.pickle as linked from Carmon et al.'s semisup-adv README"
    if not os.path.isfile(path):
        raise DataError(f"ti500k: no file at {path}; {hint} and pass its path")
    # Trusted-format data file: the user's own download of the authors' pickle.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling garbage can raise almost any exception type
        raise DataError(
            f"ti500k: {path} is not a readable pickle ({type(exc).__name__}: {one_line(exc)}); {hint}"
        ) from exc
    data = _get_key(obj, "data")
    targets = _get_key(obj, "extrapolated_targets")
    if data is None or targets is None:
        found = sorted(map(repr, obj)) if isinstance(obj, dict) else [type(obj).__name__]
        raise DataError(
            f"ti500k: {path} is not the pseudo-labelled pickle: expected a dict with keys 'data' and "
            f"'extrapolated_targets', found {', '.join(found)}; {hint}"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] not in ((32, 32, 3), (3, 32, 32)):
        raise DataError(
            f"ti500k: 'data' in {path} is {data.dtype} {data.shape}, expected uint8 (N, 32, 32, 3) "
            f"or (N, 3, 32, 32); {hint}"
        )
    images = torch.from_numpy(data)
    if data.shape[1:] == (32, 32, 3):
        images = images.permute(0, 3, 1, 2)  # HWC -> CHW
    try:
        labels = torch.from_numpy(np.asarray(targets, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"ti500k: 'extrapolated_targets' in {path} is not a list of integers ({one_line(exc)})"
        ) from exc
    info = EXTRA_DATA["ti500k"]
    check_arrays(info, images, labels, path)
    return images.contiguous(), labels


def _get_key(obj: object, key: str):
    """dict lookup accepting str or bytes keys (a Python 2 pickle read with encoding='bytes')."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    return obj.get(key.encode())
