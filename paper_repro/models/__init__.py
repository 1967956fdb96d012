"""Models: a name registry of [0,1]-input image classifiers (one file per family).

Importing this package registers every family; `create_model(name, num_classes=...)` builds one.
`torchvision:<name>` and `timm:<name>` build those libraries' networks (models/hub.py).
`build_model(cfg, info)` is the network a run trains: its arch for its dataset.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from paper_repro.models.registry import ImageClassifier, create_model, list_models, register_model

# Imported for their @register_model side effect (each family fills the registry in its own file).
from paper_repro.models import hub, mlp, preact_resnet, resnet, small_cnn, wide_resnet  # noqa: E402,F401  isort: skip

if TYPE_CHECKING:
    from paper_repro.config import RunConfig
    from paper_repro.data import DatasetInfo


def build_model(cfg: RunConfig, info: DatasetInfo) -> ImageClassifier:
    """The run's architecture for its dataset: classes, channels and normalisation come from
    the dataset, the rest from `arch` and `model_args`."""
    return create_model(cfg.arch, num_classes=info.num_classes, in_channels=info.channels,
                        mean=info.mean, std=info.std, **cfg.model_args)


__all__ = ["ImageClassifier", "build_model", "create_model", "list_models", "register_model"]
