"""Experiment files (paper_repro/experiments/*.toml): a table's or figure's rows as data, the
per-scale stand-in settings, views of other rows, seeds and pairs; and `row_config`, which
stacks a row's layers (config.py's docstring gives the order) into one frozen RunConfig.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import SCALES, RunConfig, build_config
from .errors import ConfigError

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"


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
