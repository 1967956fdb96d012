"""Start from pre-trained weights: the four `--init` forms, resolved in one place.

    torchvision:<name>[:<weights>]   torchvision's weights (enum member, default DEFAULT), e.g.
                                     torchvision:resnet50:IMAGENET1K_V1
    timm:<name>[:<file>]             timm's pretrained weights, e.g. timm:resnet50.fb_swsl_ig1b_ft_in1k;
                                     with <file>, timm's weights file from disk (offline nodes)
    run:<run-id>                     the checkpoint of a run in the store, e.g. run:cpu/table1/natural/seed0
    <path>                           a checkpoint file: a state dict, this suite's checkpoint, or a
                                     torchvision / timm state dict

Every form yields a state dict that is loaded into the model by one function, `load_into`:
- Files are read with `torch.load(weights_only=True)`: a full-model pickle, which could run code
  when unpickled, is refused with one line (`safe_load`). torchvision's cached download is first
  read the same way (see `_torchvision_weights`), and so is a timm weights file.
- Normalisation lives inside the model: torchvision and timm weights bring their mean/std (from
  the weights' transforms / timm's pretrained_cfg), which replace the model's input layer, so the
  model still takes [0,1] pixels. A bare network state dict keeps the model's own normalisation.
- When the class count differs (ImageNet's 1000 vs the dataset's 10), the final Linear keeps its
  fresh initialisation ("head replaced", said in the run's record and log).
- Any other difference is an architecture mismatch: one line with the counts of missing,
  unexpected and differently shaped keys.

For `torchvision:` and `timm:` the architecture comes from the spec: `implied_arch` gives the
model name (`torchvision:resnet50`) that `finetune` uses when `--arch` is not given. The suite's
own `resnet50` has torchvision's keys, so `--arch resnet50` takes torchvision's and timm's ResNet-50
weights too (timm's ResNet-50 has the same keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..store import layout
from ..store.files import load_error, safe_load
from ..errors import CheckpointError, ConfigError
from . import ImageClassifier, create_model
from .hub import classifier_name
from .registry import Normalize, PerImageStandardize
from .weights import load_state, mismatch, read_state

__all__ = ["Loaded", "apply_init", "implied_arch", "load_pretrained", "load_into"]

PREFIXES = ("torchvision", "timm", "run")
FORMS = "torchvision:<name>[:<weights>], timm:<name>[:<file>], run:<run-path>, or a checkpoint file"


@dataclass(frozen=True)
class Weights:
    """A state dict in ImageClassifier keys (`net.`, `normalize.`) and where it came from."""

    state: dict[str, torch.Tensor]
    source: str


@dataclass(frozen=True)
class Loaded:
    """What `apply_init` did: the source, and a note when something was adapted ('' if not)."""

    source: str
    note: str


# --- the init spec -------------------------------------------------------------------------

def _split(spec: str) -> tuple[str, str]:
    """(prefix, rest) for `prefix:rest`, ('', spec) for a file path."""
    head = spec.split("/")[0]
    if ":" not in head:
        return "", spec
    prefix, rest = spec.split(":", 1)
    if prefix not in PREFIXES:
        raise ConfigError(f"init: unknown prefix '{prefix}:' (valid: {FORMS})")
    if not rest:
        raise ConfigError(f"init: '{spec}' names nothing after '{prefix}:' (valid: {FORMS})")
    return prefix, rest


def implied_arch(spec: str | None) -> str | None:
    """The architecture a torchvision:/timm: init brings (`torchvision:resnet50`), else None."""
    if not spec:
        return None
    prefix, rest = _split(spec)
    if prefix == "torchvision":
        return f"torchvision:{rest.split(':')[0]}"
    if prefix == "timm":
        from timm.models import split_model_name_tag

        return f"timm:{split_model_name_tag(rest.split(':')[0])[0]}"
    return None


def init_weights(spec: str, *, results_dir: str | Path = "results") -> Weights:
    """The state dict an init spec names, in ImageClassifier keys."""
    prefix, rest = _split(spec)
    if prefix == "torchvision":
        name, _, weights = rest.partition(":")
        return _torchvision_weights(name, weights or "DEFAULT")
    if prefix == "timm":
        name, _, file = rest.partition(":")
        return _timm_weights(name, file or None)
    if prefix == "run":
        path = layout.run_dir(results_dir, rest) / "checkpoint.pt"
        if not path.is_file():
            raise CheckpointError(f"init run:{rest}: no checkpoint at {path} (is the run done, "
                                  "on this machine? checkpoints are not in git)")
        return Weights(_as_classifier_state(read_state(path)), str(path))
    return Weights(_as_classifier_state(read_state(spec)), spec)


def _as_classifier_state(state: dict[str, torch.Tensor], mean: Any = None,
                         std: Any = None) -> dict[str, torch.Tensor]:
    """A network's state dict (or an ImageClassifier's) in ImageClassifier keys; DDP's
    `module.` prefix dropped; the weights' mean/std as the `normalize` buffers when known."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(("net.", "normalize.")) for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    if mean is not None and std is not None:
        state["normalize.mean"] = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        state["normalize.std"] = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return state


def _torchvision_weights(name: str, weights_name: str) -> Weights:
    """torchvision's pretrained weights, as its own builder loads them (key remaps included).

    torchvision reads its download cache ($TORCH_HOME/hub/checkpoints/<file of the weights' URL>)
    with weights_only=False and checks the hash only when it downloads. So the file is first
    read here with weights_only=True (downloading it, hash-checked, if absent): an unsafe file is
    refused before torchvision's builder reads it. A file placed in the cache under the expected
    name is used as it is, which is how weights are supplied offline.
    """
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"init: unknown torchvision model {name!r} "
                          "(see torchvision.models.list_models())")
    enum = torchvision.models.get_model_weights(name)
    if weights_name not in enum.__members__:
        raise ConfigError(f"init torchvision:{name}: unknown weights {weights_name!r} "
                          f"(valid: {', '.join(enum.__members__)})")
    weights = enum[weights_name]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:
        if cached.is_file():
            raise load_error(cached, e) from None
        raise CheckpointError(f"init torchvision:{name}:{weights.name}: cannot get {weights.url} "
                              f"({str(e).strip()[:120]}); offline, put the file at {cached}") from None
    net = torchvision.models.get_model(name, weights=weights)
    transform = weights.transforms()
    state = _as_classifier_state(net.state_dict(), transform.mean, transform.std)
    return Weights(state, f"torchvision:{name}:{weights.name}")


def _timm_weights(name: str, file: str | None) -> Weights:
    """timm's pretrained weights: the Hugging Face hub, or `file` through timm's own
    `pretrained_cfg_overlay=dict(file=...)` (read here with weights_only=True first)."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"init: unknown timm model {name!r} (see timm.list_models())")
    if file is not None and not Path(file).is_file():
        raise CheckpointError(f"init timm:{name}: weights file not found: {file}")
    if file is not None and not file.endswith(".safetensors"):
        safe_load(file)  # refuse a full pickle here, whatever timm's version does with it
    overlay = {"file": file} if file else None
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:
        if file:
            raise load_error(file, e) from None
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"init timm:{name}: cannot get its pretrained weights ({reason}); "
                              "offline, give timm's weights file: timm:<name>:<file>") from None
    cfg = net.pretrained_cfg
    state = _as_classifier_state(net.state_dict(), cfg.get("mean"), cfg.get("std"))
    return Weights(state, f"timm:{name}" + (f":{file}" if file else ""))


# --- loading into a model ------------------------------------------------------------------

def load_into(model: ImageClassifier, weights: Weights, *, arch: str | None = None) -> str:
    """Load `weights` into `model`; returns a note ('' or 'head replaced: ...').

    The classifier head keeps its fresh initialisation when the class count differs; the
    weights' normalisation replaces the model's input layer; anything else that does not fit
    is an architecture mismatch (CheckpointError, one line).
    """
    state = dict(weights.state)
    own = model.state_dict()
    head = f"net.{classifier_name(model.net)}."
    note = ""
    head_keys = [k for k in own if k.startswith(head)]
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        old = state.get(f"{head}weight", torch.empty(0)).shape[:1]
        note = (f"head replaced: the weights have {old[0] if old else '?'} classes, the model "
                f"{own[head + 'weight'].shape[0]}; '{head[4:-1]}' is freshly initialised")
        for k in head_keys:
            state[k] = own[k]
    _adopt_normalisation(model, state, weights.source)
    own = model.state_dict()
    for k in ("normalize.mean", "normalize.std"):  # a bare network keeps the model's own
        if k in own and k not in state:
            state[k] = own[k]
    hint = ""
    if mismatch(own, state) and weights.source.startswith(("torchvision:", "timm:")):
        hint = f"; use --arch {implied_arch(weights.source)}"
    load_state(model, state, weights.source, arch=arch, hint=hint)
    return note


def _adopt_normalisation(model: ImageClassifier, state: dict[str, torch.Tensor],
                         source: str) -> None:
    """Weights that bring mean/std get a mean/std input layer of their size."""
    if "normalize.mean" not in state:
        return
    if isinstance(model.normalize, PerImageStandardize):
        raise CheckpointError(f"{source}: the weights expect mean/std normalisation, the model "
                              "standardises each image (another architecture)")
    if not isinstance(model.normalize, Normalize) or \
            model.normalize.mean.shape != state["normalize.mean"].shape:
        device = next(model.parameters()).device
        model.normalize = Normalize(state["normalize.mean"].flatten().tolist(),
                                    state["normalize.std"].flatten().tolist()).to(device)


def apply_init(model: ImageClassifier, spec: str, *, results_dir: str | Path = "results",
               arch: str | None = None) -> Loaded:
    """Load the weights `spec` names into `model` (any of the four forms)."""
    weights = init_weights(spec, results_dir=results_dir)
    return Loaded(weights.source, load_into(model, weights, arch=arch))


def load_pretrained(spec: str, num_classes: int, *, arch: str | None = None,
                    in_channels: int = 3, results_dir: str | Path = "results",
                    **model_args: Any) -> ImageClassifier:
    """A pre-trained model taking [0,1] images, with a fresh head if `num_classes` differs.

    torchvision:/timm: specs bring their architecture; a file or run: needs `arch` (a registry
    name, or torchvision:<name> / timm:<name>).

    Example:
        >>> model = load_pretrained("torchvision:resnet50", num_classes=10)
        >>> model = load_pretrained("timm:resnet50.fb_swsl_ig1b_ft_in1k", num_classes=1000)
        >>> model = load_pretrained("run:cpu/table1/natural/seed0", 10, arch="cnn-small", in_channels=1)
    """
    arch = arch or implied_arch(spec)
    if arch is None:
        raise ConfigError(f"load_pretrained({spec!r}): give arch= (a file or run: does not say "
                          "which network it is)")
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels, **model_args)
    apply_init(model, spec, results_dir=results_dir, arch=arch)
    model.eval()
    return model
