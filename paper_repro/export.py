"""Trained models out of the store: load one, get the images it was measured on, export it.

    load_model(run)            the network of a run in the store (`cpu/table1/aft/seed0`) or of an
                               exported folder, in eval mode, taking [0,1] images (normalisation is
                               its first layer): ready for torchattacks, AutoAttack or inference
    load_test_images(run, subset="pgd"|"aa")
                               the test images a record's number is measured on, as [0,1] floats:
                               all of them (clean), "pgd" (eval_n: PGD-20), "aa" (aa_n: AutoAttack;
                               not the first aa_n of the PGD images)
    export_model(run, out)     model.safetensors + model_info.json + README.md (a model card)

A run's weights are its `checkpoint.pt` (`select="final"`) or, where the run kept one, its
`best.pt` (`select="best"`); checkpoints are not in git, so a run must have been trained on this
machine (or its checkpoint copied back). Checkpoints are read with `torch.load(weights_only=True)`
and CRC-checked first.

An export holds weights only, as safetensors (no pickle: nothing runs when it is read), and
model_info.json records the file's sha256; `load_model` refuses a file whose hash differs (a
tampered or damaged file) with one line. The hash guards integrity, not authorship: whoever can
edit the folder can edit both files. model_info.json uses the keys of RobustBench's model cards
(name, link, dataset, architecture, eps, clean_acc, reported, autoattack_acc, additional_data,
number_forward_passes, footnote; accuracies as numbers, not strings) plus what this suite knows:
threat model, PGD-20 accuracy, the evaluation protocol and its image counts, the training method
and recipe, the code version and the config hash (model_card.py writes its content and the
README.md card; this module finds, checks, loads and writes).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from .store import files, layout
from .models.weights import load_state, load_weights
from .config import RunConfig, build_config
from .experiment import list_experiments
from .data import dataset_info
from .errors import CheckpointError, ConfigError, ReproError
from .models import ImageClassifier, build_model, create_model
from .model_card import CARD, EXPORT_FORMAT, INFO, SELECT, WEIGHTS, model_card, model_info

__all__ = ["export_model", "load_model", "load_test_images"]



def _trained_network(cfg: RunConfig, checkpoint: Path) -> ImageClassifier:
    """The run's network with the checkpoint's weights."""
    model = build_model(cfg, dataset_info(cfg.dataset))
    load_weights(model, checkpoint)  # torch.load(weights_only=True), strict state dict
    return model


# --- finding a run or an export ------------------------------------------------------------

def _locate(run: str | Path, results_dir: str | Path) -> tuple[str, Path]:
    """("export", folder) for an exported folder, ("run", folder) for a run of the store.
    `run` is a run path in the store (optionally `run:`-prefixed) or a folder."""
    text = str(run)
    spec = text.removeprefix("run:")
    folder = Path(spec)
    if (folder / INFO).is_file():
        return "export", folder
    if not text.startswith("run:") and (folder / "record.json").is_file():
        return "run", folder  # a run folder given as a path
    in_store = layout.run_dir(results_dir, spec)
    if (in_store / "record.json").is_file() or (in_store / "config.json").is_file():
        return "run", in_store
    raise ReproError(f"{text!r} is neither an exported folder (with {INFO}) nor a run in "
                     f"{layout.runs_root(results_dir)} (a run path such as "
                     "cpu/table1/aft/seed0; another store: results_dir= / --results-dir)")


def _stored_config(directory: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run's config rebuilt from its config.json (and the stored dict itself)."""
    stored = layout.read_json(directory / "config.json")
    if stored is None:
        raise ReproError(f"{directory / 'config.json'}: missing; not a run of this suite")
    values = {k: v for k, v in stored.items() if k != "config_hash"}
    try:
        return build_config((f"{directory / 'config.json'}", values)), stored
    except ConfigError as e:
        raise ConfigError(f"{directory / 'config.json'}: {e}") from None


def _rerun_hint(cfg: RunConfig) -> str:
    if cfg.experiment in list_experiments():
        seed = f" --seed {cfg.seed}" if cfg.seed else ""
        return (f"python -m paper_repro run --experiment {cfg.experiment} --row {cfg.row} "
                f"--scale {cfg.scale}{seed}")
    return "the command that trained it"


def _checkpoint(directory: Path, cfg: RunConfig, select: str) -> Path:
    """The weights file `select` names, whole (CRC-checked), or a one-line error."""
    if select not in SELECT:
        raise ConfigError(f"select: '{select}' is not one of {', '.join(SELECT)}")
    path = directory / SELECT[select]
    if select == "best" and not path.is_file():
        raise CheckpointError(f"{cfg.run_path} has no best.pt (only a run that keeps its best "
                              "epoch has one); use select final (--select final)")
    if not path.is_file():
        raise CheckpointError(f"{cfg.run_path}: no checkpoint.pt in {directory} (checkpoints are "
                              f"not in git): train the run here with `{_rerun_hint(cfg)}`, "
                              "or copy its checkpoint.pt back")
    why = files.check_checkpoint(path)
    if why:
        raise CheckpointError(f"{path}: {why}; train the run again or copy a whole checkpoint "
                              "back")
    return path


def _done_run(directory: Path) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
    """(config, stored config, record) of a finished run; a one-line error otherwise."""
    record = layout.read_record(directory)
    cfg, stored = _stored_config(directory)
    if not record or record.get("status") != layout.STATUS_DONE:
        status = (record or {}).get("status", "no record")
        raise ReproError(f"{cfg.run_path} is not done ({status}): its checkpoint is not a "
                         f"finished model; finish it first (`{_rerun_hint(cfg)}`)")
    return cfg, stored, record


# --- loading -------------------------------------------------------------------------------

def load_model(run: str | Path, *, select: str = "final", results_dir: str | Path = "results",
               device: str | torch.device = "cpu") -> ImageClassifier:
    """The trained network of `run`, in eval mode, taking [0,1] images.

    `run` is a run path in the store (`cpu/table1/aft/seed0`, below `results_dir`/runs), a run
    folder, or a folder written by `export_model`. `select` picks a run's final weights
    (checkpoint.pt) or its best epoch's (best.pt, where the run kept one).

    Example:
        >>> model = load_model("cpu/table1/aft/seed0")
        >>> model = load_model("exported/aft-fmnist")     # checks model.safetensors' sha256
    """
    kind, folder = _locate(run, results_dir)
    if kind == "export":
        model, _info = _load_export(folder)
    else:
        cfg, _stored, _record = _done_run(folder)
        model = _trained_network(cfg, _checkpoint(folder, cfg, select))
    return model.to(device).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / INFO).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / INFO}: unreadable ({' '.join(str(e).split())}); "
                              "export the model again") from None
    if not isinstance(info, dict) or "weights" not in info or "model" not in info:
        raise CheckpointError(f"{folder / INFO}: not a model_info.json of this suite")
    if info.get("export_format", 0) > EXPORT_FORMAT:
        raise CheckpointError(f"{folder / INFO}: export format {info['export_format']} is newer "
                              f"than this code reads ({EXPORT_FORMAT}); update the code")
    return info


def _load_export(folder: Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """An exported model, after checking its weights file against the recorded sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = _read_info(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; export the model again")
    want, got = info["weights"].get("sha256"), _sha256(weights)
    if got != want:
        raise CheckpointError(f"{weights}: sha256 {got[:16]}... differs from {INFO}'s "
                              f"{str(want)[:16]}...: the file was changed or damaged after "
                              "export; refusing it (export the model again)")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a whole safetensors file "
                              f"({' '.join(str(e).split())})") from None
    m = info["model"]

    def buffer(key: str) -> list[float] | None:
        return state[key].flatten().tolist() if key in state else None

    model = create_model(m["arch"], num_classes=m["num_classes"], in_channels=m["in_channels"],
                         mean=buffer("normalize.mean"), std=buffer("normalize.std"),
                         **m.get("model_args", {}))
    load_state(model, state, weights, arch=m["arch"])
    return model, info


SUBSETS = ("pgd", "aa")  # the images a record's PGD-20 and AutoAttack numbers are measured on


def _subset_size(kind: str, folder: Path, subset: str) -> int:
    """How many images the record (or the export's model_info.json) measured `subset` on:
    PGD on the fixed subset of eval_n images, AutoAttack on the fixed subset of aa_n (the first
    aa_n of the same fixed permutation, so a subset of PGD's images, but not x[:aa_n] of them)."""
    if kind == "export":
        ev = _read_info(folder).get("evaluation") or {}
        n = ev.get("pgd_n") if subset == "pgd" else ev.get("aa_n")
    else:
        record = layout.read_json(folder / "record.json") or {}
        measured = subset == "pgd" or record.get("aa_acc") is not None
        n = record.get("eval_n" if subset == "pgd" else "aa_n") if measured else None
    if not n:
        what = "PGD-20" if subset == "pgd" else "AutoAttack"
        raise ReproError(f"load_test_images: {folder} has no {what} result, so no "
                         f"subset='{subset}' images")
    return int(n)


def load_test_images(run: str | Path, n: int | None = None, *, subset: str | None = None,
                     results_dir: str | Path = "results") -> tuple[torch.Tensor, torch.Tensor]:
    """(images as float [0,1] N×C×H×W, labels) of the run's test set, in test-set order.

    - no argument: all of it (where the record's clean_acc is measured);
    - `subset="pgd"`: the images of the record's pgd_acc (its eval_n fixed images);
    - `subset="aa"`: the images of the record's aa_acc and aa_clean_acc (its aa_n fixed images).
      These are NOT `load_test_images(run, subset="pgd")[0][:aa_n]`: both subsets are the first
      n of one fixed permutation, sorted, so the AA images are among PGD's but not its first aa_n;
    - `n`: the fixed subset of n images (`n=eval_n` is subset="pgd", `n=aa_n` is subset="aa").
    """
    from .data import dataset_info, load_arrays
    from .robustness.evaluation import fixed_subset

    kind, folder = _locate(run, results_dir)
    if subset is not None:
        if subset not in SUBSETS:
            raise ConfigError(f"load_test_images: subset '{subset}' is not one of "
                              f"{', '.join(SUBSETS)}")
        if n is not None:
            raise ConfigError("load_test_images: give n or subset, not both")
        n = _subset_size(kind, folder, subset)
    if kind == "export":
        dataset, data_root = _read_info(folder)["dataset"], None
    else:
        cfg, _stored = _stored_config(folder)
        dataset, data_root = cfg.dataset, cfg.data_root
    if not dataset_info(dataset).in_memory:
        raise ConfigError(f"load_test_images: {dataset} streams from disk; read its val/ folder "
                          "with paper_repro.data instead")
    images, labels = load_arrays(dataset, data_root, train=False)
    idx = fixed_subset(len(labels), n)
    return images[idx].float().div_(255), labels[idx]


# --- exporting -----------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReproError(f"{out} exists and is not an empty folder; choose another --out or "
                         "remove it (an export never overwrites)")


def export_model(run: str | Path, out: str | Path, *, select: str = "final",
                 results_dir: str | Path = "results") -> Path:
    """Write a run's model to the folder `out`: model.safetensors, model_info.json, README.md.

    The folder is written whole or not at all (a temporary folder, then a rename), and an
    existing non-empty `out` is refused. Returns `out`.
    """
    from safetensors.torch import save_file

    kind, folder = _locate(run, results_dir)
    if kind == "export":
        raise ReproError(f"{run} is already an export; copy the folder instead")
    cfg, stored, record = _done_run(folder)
    out = Path(out)
    _check_out(out)
    model = _trained_network(cfg, _checkpoint(folder, cfg, select)).eval()
    info = model_info(cfg, stored, record, model, select)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}{files.TEMP_SUFFIX}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "run": cfg.run_path})
        info["weights"] = {"file": WEIGHTS, "format": "safetensors",
                           "sha256": _sha256(tmp / WEIGHTS),
                           "bytes": (tmp / WEIGHTS).stat().st_size, "tensors": len(state),
                           "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / CARD).write_text(model_card(info))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
