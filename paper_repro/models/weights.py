"""Model weights into a model, one way for every source: a file is read with
`torch.load(weights_only=True)` (`store.files.safe_load`: a full pickle, which could run code,
is refused), the state dict is unwrapped from the checkpoint around it, and a state dict that
does not fit the model is one line saying how (counts of missing, unexpected and differently
shaped keys, with an example). Used for a run's checkpoint (evaluation, export, a fine-tune's
pre-training, figures), `--init` files and timm/torchvision weights (pretrained.py), and an
export's safetensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..store.files import safe_load


def unwrap(obj: Any, source: Path | str) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint: ours keeps it under 'model', timm's training
    checkpoints under 'state_dict'; anything else is taken as the state dict itself."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: not a state dict (expected parameter names -> tensors)")
    return obj


def read_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a plain state dict or a checkpoint around one)."""
    return unwrap(safe_load(path), path)


def mismatch(own: dict[str, Any], state: dict[str, Any]) -> str:
    """'' when `state` fits a model whose state dict is `own`, else how it does not (one line)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and hasattr(state[k], "shape")
                and state[k].shape != own[k].shape]
    if not (missing or unexpected or reshaped):
        return ""
    example = (missing + unexpected + reshaped)[0]
    return (f"{len(missing)} missing, {len(unexpected)} unexpected and {len(reshaped)} "
            f"differently shaped keys (e.g. '{example}')")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str, *,
               arch: str | None = None, hint: str = "") -> None:
    """Load `state` into `model` strictly; CheckpointError (one line) if it does not fit."""
    why = mismatch(model.state_dict(), state)
    if why:
        what = arch or type(getattr(model, "net", model)).__name__
        raise CheckpointError(f"{source}: does not fit architecture {what}: {why}{hint}")
    model.load_state_dict(state)


def load_weights(model: nn.Module, path: Path | str, *, arch: str | None = None) -> None:
    """The weights of a file (a run's checkpoint.pt / best.pt, or a plain state dict) into
    `model`, safely and strictly."""
    load_state(model, read_state(path), path, arch=arch)
