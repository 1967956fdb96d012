"""Models: a name registry of [0,1]-input image classifiers (one file per family).

Importing this package registers every family; `create_model(name, num_classes=...)` builds one.
`torchvision:<name>` and `timm:<name>` build those libraries' networks (models/hub.py).
"""

from paper_repro.models.registry import ImageClassifier, create_model, list_models, register_model

# Imported for their @register_model side effect (each family fills the registry in its own file).
from paper_repro.models import hub, preact_resnet, resnet, small_cnn, wide_resnet  # noqa: E402,F401  isort: skip

__all__ = ["ImageClassifier", "create_model", "list_models", "register_model"]
