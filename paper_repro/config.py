"""The typed run configuration, resolved once from method recipe + experiment file + CLI flags.

Resolution order (later wins), the same for every run:
  1. `RunConfig` defaults
  2. the method's reference recipe (`Method.recipe`: the paper-scale defaults of its reference code)
  3. the experiment's scale block (`[scales.cpu]`: dataset, model and budget of the stand-in)
  4. the row's own keys, then the row's scale block (`[rows.cpu]`)
  5. CLI overrides
Dict-valued keys (method_args, schedule_args, model_args, pretrain) merge key by key.
The result is frozen; `config_hash()` identifies it (execution-only fields excluded).
(Over 400 lines: the fields with their roles (hash, evaluation, execution, inherited by a
pre-training), their validation and the experiment files that resolve into them are one path
from TOML to a frozen config, kept in one file.)
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
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

SCALES = ("smoke", "cpu", "paper")
EXPERIMENTS_DIR = Path(__file__).parent / "experiments"


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


# --- experiment files ---------------------------------------------------------------------

@dataclass(frozen=True)
class Experiment:
    """A table or figure: its rows (data, not code) and the per-scale stand-in settings."""

    name: str
    title: str
    paper_csv: str | None
    scales: dict[str, dict]
    rows: tuple[dict, ...]
    footnote: str = ""
    time_unit: str = "min"  # the paper's unit for the time column: "min" or "hours"
    kind: str = "table"     # "table" (rendered as a table) or "figure" (its runs feed a figure)
    seeds: dict[str, int] = field(default_factory=dict)  # runs per row a sweep makes, per scale
    # (row, baseline) pairs whose per-seed differences the table reports (report/paired.py)
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def row_ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    def source_row(self, row_id: str) -> str:
        """The row whose run `row_id` shows: itself, or the row it is a view of (written
        "<experiment>/<row>" for another experiment's row: see `source`)."""
        return self.row(row_id).get("view_of", row_id)

    def source(self, row_id: str) -> tuple[str, str]:
        """(experiment, row) of the run `row_id` shows: a view of another experiment's row
        (`view_of = "table1/pgd_at"`) shows that experiment's runs, trained and stored once."""
        source = self.source_row(row_id)
        experiment, _, row = source.rpartition("/")
        return (experiment or self.name, row)

    def row_select(self, row_id: str) -> str | None:
        """A view row's checkpoint ("best" or "final"); None for a row that is a run itself."""
        row = self.row(row_id)
        return row.get("select", "best") if "view_of" in row else None

    def row(self, row_id: str) -> dict:
        for r in self.rows:
            if r["id"] == row_id:
                return r
        raise ConfigError(f"experiment '{self.name}' has no row '{row_id}' "
                          f"(rows: {', '.join(self.row_ids)})")

    def scale_chain(self, scale: str) -> list[str]:
        """Scales whose settings apply, base first: smoke inherits cpu (`inherits = "cpu"`)."""
        chain: list[str] = []
        while scale:
            chain.insert(0, scale)
            scale = self.scales.get(scale, {}).get("inherits", "")
        return chain


_ROW_META = {"id", "label", "method", "paper_row", "note", "view_of", "select", "tuned",
             *SCALES}
SELECTS = ("final", "best")  # which checkpoint of a run a table shows (never in the hash)
_VIEW_KEYS = {"id", "label", "paper_row", "note", "view_of", "select"}


def _check_views(rows: list[dict], path: Path) -> list[dict]:
    """A view row (`view_of = "<row>"`, `select = "best"|"final"`) shows another row's run at
    that checkpoint: it trains nothing, so it takes no config keys; it gets its source's method
    (for labels and markers). `view_of = "<experiment>/<row>"` shows another experiment's row
    (its runs, its config hash), so a table can reuse runs without training them again."""
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        if "view_of" not in r:
            continue
        other, _, row_id = r["view_of"].rpartition("/")
        if other:
            try:
                others = {o["id"]: o for o in load_experiment(other).rows}
            except ConfigError:
                others = {}
            by_id[r["view_of"]] = others.get(row_id, {"view_of": "missing"})
        source, extra = by_id.get(r["view_of"]), sorted(set(r) - _VIEW_KEYS)
        if source is None or "view_of" in source:
            problem = ("view_of must name another row of the file, or \"<experiment>/<row>\" "
                       "of another experiment file, that is not itself a view")
        elif extra:
            problem = f"a view trains nothing, so it takes no config keys ({', '.join(extra)})"
        elif r.get("select", "best") not in SELECTS:
            problem = f"select must be one of {', '.join(SELECTS)}"
        else:
            continue
        raise ConfigError(f"{path}: row '{r['id']}' (view_of = '{r['view_of']}'): {problem}")
    return [{**r, "method": by_id[r["view_of"]]["method"]} if "view_of" in r else r
            for r in rows]


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def load_experiment(name_or_path: str) -> Experiment:
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"no experiment file '{name_or_path}' "
                          f"(known: {', '.join(list_experiments())})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None
    rows = data.get("rows", [])
    if not rows or any("id" not in r or ("method" not in r and "view_of" not in r)
                       for r in rows):
        raise ConfigError(f"{path}: every [[rows]] entry needs an id and a method (or view_of)")
    return Experiment(name=data.get("name", path.stem), title=data.get("title", path.stem),
                      paper_csv=data.get("paper_csv"), scales=data.get("scales", {}),
                      rows=tuple(_check_views(rows, path)), footnote=data.get("footnote", ""),
                      time_unit=data.get("time_unit", "min"), kind=data.get("kind", "table"),
                      seeds=_check_seeds(data.get("seeds", {}), path),
                      pairs=_check_pairs(data.get("pairs", []), [r["id"] for r in rows], path))


def _check_pairs(pairs: Any, row_ids: list[str], path: Path) -> tuple[tuple[str, str], ...]:
    """`pairs = [["aft", "pgd_at"], ...]`: (row, baseline) pairs of rows of this file."""
    if not isinstance(pairs, list) or any(
            not isinstance(p, list) or len(p) != 2 or any(r not in row_ids for r in p)
            for p in pairs):
        raise ConfigError(f"{path}: pairs must be a list of [row, baseline] pairs of this "
                          f"file's rows ({', '.join(row_ids)}); got {pairs!r}")
    return tuple((row, base) for row, base in pairs)


def _check_seeds(seeds: Any, path: Path) -> dict[str, int]:
    """`seeds = { cpu = 3 }`: how many seeds a sweep runs per row at each scale (default 1)."""
    if not isinstance(seeds, dict) or any(
            s not in SCALES or not isinstance(n, int) or isinstance(n, bool) or n < 1
            for s, n in seeds.items()):
        raise ConfigError(f"{path}: seeds must map scales ({', '.join(SCALES)}) to counts "
                          f">= 1, e.g. seeds = {{ cpu = 3 }}; got {seeds!r}")
    return dict(seeds)


def unsupported_reason(exp: Experiment, row_id: str, scale: str) -> str | None:
    """Why a row cannot run at this scale (`unsupported = "..."` in its scale block), or None.
    A view row can run wherever its source row can."""
    other, row_id = exp.source(row_id)
    if other != exp.name:
        return unsupported_reason(load_experiment(other), row_id, scale)
    for s in exp.scale_chain(scale):
        reason = exp.row(row_id).get(s, {}).get("unsupported")
        if reason:
            return str(reason)
    return None


def controlled_name(experiment: str, arch: str) -> str:
    """Where a controlled variant of an experiment is stored and rendered."""
    return f"{experiment}-controlled-{arch}"


def row_config(exp: Experiment, row_id: str, scale: str,
               recipe_of: Callable[[str], Mapping[str, Any]], *, seed: int = 0,
               overrides: Mapping[str, Any] | None = None,
               controlled_arch: str | None = None) -> RunConfig:
    """The frozen config of one row at one scale (see the module docstring for the order),
    on top of `recipe_of(method)`, the recipe of the row's method. The method registry is above
    this module, so it passes its look-up in: `training.methods.resolve_row` is the verb.

    `controlled_arch` runs the row on that architecture instead of its reference one (model
    options and pre-training model options dropped), stored as its own experiment, so every
    method can be compared on one network with the one evaluation protocol. A view row
    resolves to its source row's config: the same run, never a second training.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}' (valid: {', '.join(SCALES)})")
    other, row_id = exp.source(row_id)
    if other != exp.name:  # another experiment's run, exactly as that experiment resolves it
        return row_config(load_experiment(other), row_id, scale, recipe_of, seed=seed,
                          overrides=overrides, controlled_arch=controlled_arch)
    row = exp.row(row_id)
    reason = unsupported_reason(exp, row_id, scale)
    if reason:
        raise ConfigError(f"{exp.name} row '{row_id}' is not supported at scale {scale}: {reason}")
    layers: list[tuple[str, Mapping[str, Any]]] = [("method recipe", recipe_of(row["method"]))]
    for s in exp.scale_chain(scale):
        block = {k: v for k, v in exp.scales.get(s, {}).items() if k != "inherits"}
        layers.append((f"{exp.name} [scales.{s}]", block))
    layers.append((f"{exp.name} row '{row_id}'",
                   {k: v for k, v in row.items() if k not in _ROW_META}))
    for s in exp.scale_chain(scale):
        layers.append((f"{exp.name} row '{row_id}' [{s}]", row.get(s, {})))
    layers.append(("command line", overrides or {}))
    cfg = build_config(*layers, experiment=exp.name, row=row_id, scale=scale, seed=seed,
                       method=row["method"])
    if controlled_arch is None:
        return cfg
    values = cfg.to_dict()
    values.update(arch=controlled_arch, model_args={},
                  experiment=controlled_name(exp.name, controlled_arch))
    if values["pretrain"] is not None:
        values["pretrain"] = {k: v for k, v in values["pretrain"].items() if k != "model_args"}
    return build_config(("controlled", values))


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
