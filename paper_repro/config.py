"""The typed run configuration, resolved once from method recipe + experiment file + CLI flags.

Resolution order (later wins), the same for every run:
  1. `RunConfig` defaults
  2. the method's reference recipe (`Method.recipe`: the paper-scale defaults of its reference code)
  3. the experiment's scale block (`[scales.cpu]`: dataset, model and budget of the stand-in)
  4. the row's own keys, then the row's scale block (`[rows.cpu]`)
  5. CLI overrides
Dict-valued keys (method_args, schedule_args, model_args, pretrain) merge key by key.
The result is frozen; `config_hash()` identifies it (execution-only fields excluded).
Layers 3 and 4 come from the experiment files, read by paper_repro/experiment.py
(`row_config` stacks the layers and calls `build_config`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping

from .errors import ConfigError

SCALES = ("smoke", "cpu", "paper")


# The roles of RunConfig's fields, declared once on each field (`_field`) and read by the hash,
# the pre-training (pipeline.pretrain_config), the record and the export:
#   hash: "always" (the default: the field identifies the run), "stable" (in the hash only when
#         it differs from its default: every field added after the first results were stored,
#         so adding one never orphans the runs already done) or "never" (where files are, how a
#         model is measured);
#   role: "recipe" (the default: what is trained), "identity" (which run of the table it is),
#         "execution" (how and where it runs) or "evaluation" (how the trained model is measured);
#   inherited_by_pretrain: an AFT row's natural pre-training takes the row's value (else the
#         natural recipe's). A new field says here whether it is inherited.
_HASH_ROLES = ("always", "stable", "never")
_ROLES = ("recipe", "identity", "execution", "evaluation")


def _field(default: Any = None, *, factory: Callable[[], Any] | None = None,
           hashed: str = "always", role: str = "recipe",
           inherited_by_pretrain: bool = False) -> Any:
    """A RunConfig field with its roles in the field's metadata (see above)."""
    if hashed not in _HASH_ROLES or role not in _ROLES:
        raise ValueError(f"RunConfig field roles: hashed {hashed!r}, role {role!r}")
    meta = {"hash": hashed, "role": role, "inherited_by_pretrain": inherited_by_pretrain}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. ε and α are fractions of the [0,1] pixel range.
    Each field's roles (hash, role, inherited by a pre-training) are declared on it: `_field`."""

    # identity
    experiment: str = _field("adhoc", role="identity")
    row: str = _field("run", role="identity")
    scale: str = _field("cpu", role="identity")
    seed: int = _field(0, role="identity", inherited_by_pretrain=True)
    # method
    method: str = "natural"
    method_args: dict = field(default_factory=dict)
    # data
    dataset: str = _field("fashion-mnist", inherited_by_pretrain=True)
    data_root: str | None = _field(None, hashed="never", role="execution",
                                   inherited_by_pretrain=True)
    # first N images of a fixed permutation (data seed 0)
    train_subset: int | None = _field(None, inherited_by_pretrain=True)
    extra_data: str | None = None        # pre-training only: None, "pseudo-label" or "ti500k"
    extra_data_n: int = 0                # pseudo-label: held-out images taken after the subset
    extra_data_path: str | None = None   # ti500k: the pickle
    # validation images held out of training (0: none)
    val_n: int = _field(0, hashed="stable", inherited_by_pretrain=True)
    batch_size: int = 128
    augment_pad: int = _field(4, inherited_by_pretrain=True)
    augment_pad_mode: str = "zeros"
    augment_pad_value: float = 0.0
    augment_flip: bool = _field(True, inherited_by_pretrain=True)
    drop_last: bool = True
    # model
    arch: str = _field("cnn-small", inherited_by_pretrain=True)
    model_args: dict = _field(factory=dict, inherited_by_pretrain=True)
    init: str | None = None              # start from weights: see pretrained.py (4 forms)
    pretrain: dict | None = None         # AFT: overrides for the natural pre-training run
    # optimisation
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_scope: str = "all"                # "all", "weights" (conv/linear weights only), "no_bn"
    schedule: str = "piecewise"
    schedule_args: dict = field(default_factory=dict)
    # threat model: the evaluated one (and the trained one)
    eps: float = _field(8 / 255, inherited_by_pretrain=True)
    # train at another ε (Table 2's AFT ε = 10/255, tested at 8/255)
    train_eps: float | None = _field(None, hashed="stable")
    # evaluation (DESIGN §7): PGD-20, α = ε/4, one random start, eval mode, fp32
    eval_steps: int = _field(20, inherited_by_pretrain=True)
    eval_alpha: float | None = _field(None, inherited_by_pretrain=True)  # None: ε/4
    # test images for the final PGD (None: all)
    eval_n: int | None = _field(None, inherited_by_pretrain=True)
    eval_batch: int = _field(500, inherited_by_pretrain=True)
    # per-epoch PGD on this many fixed test and train images
    monitor_n: int = _field(500, inherited_by_pretrain=True)
    monitor_steps: int = _field(10, inherited_by_pretrain=True)
    # evaluation protocol (EVALUATION_FIELDS: never in the hash; the record says what was measured)
    # AutoAttack on this many PGD images (None: all, 0: off; a pre-training: 0)
    aa_n: int | None = _field(None, hashed="never", role="evaluation")
    # gradient-masking sanity checks (evaluation.py)
    eval_checks: bool = _field(True, hashed="never", role="evaluation",
                               inherited_by_pretrain=True)
    # speed (fastpath.py): the same algorithm, faster; in the hash only when set
    # "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"
    precision: str = _field("auto", hashed="stable", inherited_by_pretrain=True)
    # None: on with CUDA
    channels_last: bool | None = _field(None, hashed="stable", inherited_by_pretrain=True)
    # torch.compile the model (`--compile`)
    compile: bool = _field(False, hashed="stable", inherited_by_pretrain=True)
    # execution: device, results_dir (and data_root) are not hashed; deterministic, max_steps are
    device: str = _field("auto", hashed="never", role="execution", inherited_by_pretrain=True)
    deterministic: bool = _field(False, role="execution", inherited_by_pretrain=True)
    # stop after N optimiser steps (smoke-testing paper configs)
    max_steps: int | None = _field(None, role="execution", inherited_by_pretrain=True)
    results_dir: str = _field("results", hashed="never", role="execution",
                              inherited_by_pretrain=True)

    @property
    def eval_alpha_value(self) -> float:
        return self.eps / 4 if self.eval_alpha is None else self.eval_alpha

    @property
    def run_path(self) -> str:
        """The run's id and its place in the store: <scale>/<experiment>/<row>/seed<k>."""
        return f"{self.scale}/{self.experiment}/{self.row}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self, exclude: tuple[str, ...] = ()) -> str:
        """sha256 of the canonical JSON of every field that changes the result.

        Fields declared `hashed="stable"` (`HASH_STABLE_FIELDS`: added after the first results
        were stored) enter the hash only when they differ from their default, so adding a field
        never orphans the runs already done; `hashed="never"` fields never enter it.
        """
        d = {k: v for k, v in self.to_dict().items()
             if k not in _EXECUTION_FIELDS and k not in EVALUATION_FIELDS and k not in exclude
             and not (k in HASH_STABLE_FIELDS and v == _DEFAULTS[k])}
        stable = HASH_STABLE_METHOD_ARGS.get(self.method, {})
        if "method_args" in d:
            d["method_args"] = {k: v for k, v in d["method_args"].items()
                                if not (k in stable and v == stable[k])}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def cell_hash(self) -> str:
        """Identifies a table cell: the config up to the seed (seeds of one cell share it)."""
        return self.config_hash(exclude=("seed",))


def _fields_where(hashed: str | None = None, role: str | None = None,
                  inherited_by_pretrain: bool | None = None) -> tuple[str, ...]:
    """The RunConfig fields (in declaration order) whose declared roles are the given ones."""
    wanted = {"hash": hashed, "role": role, "inherited_by_pretrain": inherited_by_pretrain}
    defaults = {"hash": "always", "role": "recipe", "inherited_by_pretrain": False}
    return tuple(f.name for f in dataclasses.fields(RunConfig)
                 if all(v is None or f.metadata.get(k, defaults[k]) == v
                        for k, v in wanted.items()))


# How a trained model is measured, not what is trained: never hashed, so asking a done run for
# more evaluation (AutoAttack, checks) re-evaluates its checkpoint instead of orphaning it; the
# record stores the protocol it was measured with.
EVALUATION_FIELDS: frozenset[str] = frozenset(_fields_where(role="evaluation"))
_EXECUTION_FIELDS = frozenset(_fields_where(hashed="never", role="execution"))
# In the hash only when not the default (see config_hash); evaluation fields trivially too.
HASH_STABLE_FIELDS: frozenset[str] = frozenset(_fields_where(hashed="stable")) | EVALUATION_FIELDS
# What an AFT row's natural pre-training takes from the row (pipeline.pretrain_config).
PRETRAIN_INHERITED_FIELDS: tuple[str, ...] = _fields_where(inherited_by_pretrain=True)
# Not the training recipe: which run it is, how it ran, how it was measured (export's recipe).
NOT_RECIPE_FIELDS: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("role", "recipe") != "recipe")
# The same for a method's settings (method_args): settings added after its runs were stored,
# with their defaults (tests/test_modern_methods.py checks them against the method's Settings).
HASH_STABLE_METHOD_ARGS: dict[str, dict[str, Any]] = {
    "aft": {"loss": "ce", "beta": 6.0, "awp": False, "gamma": None, "awp_warmup": 0},
}
_FIELD_TYPES = typing.get_type_hints(RunConfig)
_DICT_FIELDS = frozenset(k for k, t in _FIELD_TYPES.items()
                         if t is dict or dict in typing.get_args(t))
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))
_DEFAULTS = RunConfig().to_dict()

_CHOICES = {
    "scale": SCALES,
    "optimizer": ("sgd", "adam"),
    "wd_scope": ("all", "weights", "no_bn"),
    "augment_pad_mode": ("zeros", "reflect", "constant"),
    "extra_data": (None, "pseudo-label", "ti500k"),
    "precision": ("auto", "fp32", "bf16"),
}


def parse_fraction(value: Any, key: str) -> float:
    """Accept 0.031, 8/255 as a string, or an int; return a float."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}: expected a number such as 0.031 or 8/255, got {value!r}")


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the field's annotation; numbers may be given as 'a/b'."""
    return coerce(key, _FIELD_TYPES[key], value)


def coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a type annotation (int, float, bool, str, dict, or X | None);
    numbers may be given as 'a/b'. Also checks the settings of methods."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) \
        else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: a value is required")
    base = next(t for t in allowed if t is not type(None))
    if base is float:
        return parse_fraction(value, key)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
        return value
    return value  # other annotations (tensors, tuples) are the owner's to check


def _merge(base: dict[str, Any], layer: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    if "schedule" in layer and layer["schedule"] != out.get("schedule"):
        out["schedule_args"] = {}  # a schedule's arguments belong to it: a new one starts clean
    for key, value in layer.items():
        if key not in _FIELD_TYPES:
            raise ConfigError(f"unknown config key '{key}' in {where} "
                              f"(valid: {', '.join(FIELD_NAMES)})")
        if key in _DICT_FIELDS and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) \
            else v
    return out


def _validate(values: dict[str, Any]) -> dict[str, Any]:
    values = {k: _coerce(k, v) for k, v in values.items()}
    for key, choices in _CHOICES.items():
        if values.get(key) not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"{key}: '{values.get(key)}' is not one of {shown}")
    checks = [
        (0 <= values["eps"] <= 1, "eps must be in [0, 1] (a fraction of the pixel range, e.g. 8/255)"),
        (values["train_eps"] is None or 0 <= values["train_eps"] <= 1,
         "train_eps must be in [0, 1] (a fraction of the pixel range, e.g. 10/255)"),
        (values["eval_alpha"] is None or 0 < values["eval_alpha"] <= 1, "eval_alpha must be in (0, 1]"),
        (values["epochs"] >= 1 or (values["epochs"] == 0 and values["init"]),
         "epochs must be >= 1 (0 only with init: evaluate a pre-trained model)"),
        (values["batch_size"] >= 1, "batch_size must be >= 1"),
        (values["lr"] > 0, "lr must be > 0"),
        (values["weight_decay"] >= 0, "weight_decay must be >= 0"),
        (0 <= values["momentum"] < 1, "momentum must be in [0, 1)"),
        (values["seed"] >= 0, "seed must be >= 0"),
        (values["eval_steps"] >= 0, "eval_steps must be >= 0"),
        (values["train_subset"] is None or values["train_subset"] >= 1, "train_subset must be >= 1"),
        (values["eval_n"] is None or values["eval_n"] >= 1, "eval_n must be >= 1"),
        (values["aa_n"] is None or values["aa_n"] >= 0, "aa_n must be >= 0 (0: no AutoAttack)"),
        (values["max_steps"] is None or values["max_steps"] >= 1, "max_steps must be >= 1"),
        (values["augment_pad"] >= 0, "augment_pad must be >= 0"),
        (values["monitor_n"] >= 0, "monitor_n must be >= 0"),
        (values["extra_data_n"] >= 0, "extra_data_n must be >= 0"),
        (values["val_n"] >= 0, "val_n must be >= 0 (0: no validation split)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return values


def build_config(*layers: tuple[str, Mapping[str, Any]], **identity: Any) -> RunConfig:
    """Merge (where, values) layers over the defaults, validate, freeze."""
    values = {f.name: getattr(RunConfig(), f.name) for f in dataclasses.fields(RunConfig)}
    for where, layer in layers:
        values = _merge(values, layer, where)
    values = _merge(values, identity, "run identity")
    return RunConfig(**_validate(values))


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if "." in key:  # method_args.steps=7
        head, tail = key.split(".", 1)
        return head, {tail: value}
    return key, value
