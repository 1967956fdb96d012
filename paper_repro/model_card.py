"""What an export says about its model: model_info.json (RobustBench's model-card keys plus what
this suite knows: threat model, PGD-20, the evaluation protocol and its image counts, the
training method and recipe, provenance) and the README.md model card, from a run's config and
record. export.py finds the run, checks its weights and writes the folder.
"""
from __future__ import annotations

from typing import Any

from .config import NOT_RECIPE_FIELDS, RunConfig
from .errors import ConfigError
from .experiment import load_experiment
from .models import ImageClassifier
from .store.checkpoints import BEST_FILE

EXPORT_FORMAT = 1  # model_info.json's `export_format`; a newer one is refused
WEIGHTS, INFO, CARD = "model.safetensors", "model_info.json", "README.md"  # an export's files
SELECT = {"final": "checkpoint.pt", "best": BEST_FILE}  # the run's weights each select names
PAPER_LINK = "https://arxiv.org/abs/2012.13628"  # Jeddi, Shafiee & Wong 2020


def _eps_text(eps: float) -> str:
    """8/255 for a multiple of 1/255, else the plain number (0.1)."""
    k = eps * 255
    return f"{round(k)}/255" if eps and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def _architecture(cfg: RunConfig, num_classes: int, in_channels: int) -> dict[str, Any]:
    """The network's name as the library that can rebuild it spells it, and the call."""
    library, colon, name = cfg.arch.partition(":")
    if not colon:
        args = "".join(f", {k}={v!r}" for k, v in cfg.model_args.items())
        return {"library": "paper_repro", "architecture": cfg.arch,
                "build": f"paper_repro.create_model({cfg.arch!r}, num_classes={num_classes}, "
                         f"in_channels={in_channels}{args})"}
    call = {"torchvision": "torchvision.models.get_model", "timm": "timm.create_model"}[library]
    return {"library": library, "architecture": name,
            "build": f"{call}({name!r}, num_classes={num_classes})"}


def _normalization(model: ImageClassifier) -> dict[str, Any]:
    kind = type(model.normalize).__name__
    if kind == "Normalize":
        return {"kind": "mean-std", "mean": model.normalize.mean.flatten().tolist(),
                "std": model.normalize.std.flatten().tolist()}
    if kind == "PerImageStandardize":
        return {"kind": "per-image standardisation", "input_scale": model.normalize.input_scale}
    return {"kind": "none"}


def _label(cfg: RunConfig) -> str:
    try:
        return str(load_experiment(cfg.experiment).row(cfg.row).get("label", cfg.method))
    except ConfigError:
        return cfg.method


def _uses_extra_data(cfg: RunConfig) -> bool:
    """RobustBench's `additional_data`: data beyond the training set, in training, in its
    pre-training, or in weights it started from."""
    pretrain = cfg.pretrain or {}
    return bool(cfg.extra_data or pretrain.get("extra_data")
                or (cfg.init or "").startswith(("torchvision:", "timm:")))


def model_info(cfg: RunConfig, stored: dict[str, Any], record: dict[str, Any],
               model: ImageClassifier, select: str) -> dict[str, Any]:
    """model_info.json without its `weights` entry (which describes the written file)."""
    from .data import dataset_info

    info = dataset_info(cfg.dataset)
    # the record's numbers are the final model's, and the best epoch's as best_* (evaluation.py)
    prefix = "best_" if select == "best" else ""
    measured = select == "final" or record.get("best_epoch") is not None
    acc = {k: (record.get(prefix + k) if measured else None)
           for k in ("clean_acc", "pgd_acc", "aa_acc", "checks")}
    steps = record.get("eval_steps", cfg.eval_steps)
    alpha = record.get("eval_alpha") or cfg.eval_alpha_value
    train_eps = record.get("train_eps")
    aa_n = int(record["aa_n"]) if record.get("aa_acc") is not None else 0
    # clean accuracy is measured on the whole test split (evaluation.py); a streamed dataset
    # (ImageNet) measures it on the fixed subset of eval_n images instead
    clean_n = info.test_size if info.in_memory else record.get("eval_n")
    protocol = _protocol(cfg, record, steps, alpha, aa_n)
    footnote = _footnote(cfg, record, select, measured)
    arch = _architecture(cfg, info.num_classes, info.channels)
    return {
        "export_format": EXPORT_FORMAT,
        "name": f"{_label(cfg)}, {cfg.arch} on {cfg.dataset} ({cfg.run_path})",
        "link": PAPER_LINK,
        "dataset": cfg.dataset,
        "threat_model": "Linf",
        "eps": _eps_text(cfg.eps),
        "eps_value": cfg.eps,
        "architecture": arch["architecture"],
        "additional_data": _uses_extra_data(cfg),
        "number_forward_passes": 1,
        "clean_acc": acc["clean_acc"],
        "reported": acc["pgd_acc"],  # RobustBench: the robust accuracy the training paper reports
        "pgd20_acc": acc["pgd_acc"] if steps == 20 else None,
        "autoattack_acc": acc["aa_acc"],
        "footnote": footnote.strip(),
        "evaluation": {"protocol": protocol, "clean_n": clean_n, "pgd_n": record.get("eval_n"),
                       "aa_n": aa_n, "pgd_steps": steps, "pgd_alpha": alpha,
                       "random_starts": 1, "batch": cfg.eval_batch,
                       "aa_version": record.get("aa_version"),
                       "aa_package": record.get("aa_package"),
                       "checks": acc["checks"], "measured_on": measured},
        "training": {"method": cfg.method, "label": _label(cfg), "run": cfg.run_path,
                     "experiment": cfg.experiment, "row": cfg.row, "scale": cfg.scale,
                     "seed": cfg.seed, "weights": f"{SELECT[select]} ({select})",
                     "epochs_done": record.get("epochs_done"),
                     "best_epoch": record.get("best_epoch") if select == "best" else None,
                     "train_eps": cfg.eps if train_eps is None else train_eps,
                     "train_minutes": record.get("train_minutes"),
                     "train_flops": record.get("train_flops"),
                     "pretrain_source": record.get("pretrain_source") or None,
                     "recipe": {k: v for k, v in stored.items()
                                if k not in NOT_RECIPE_FIELDS and k != "config_hash"}},
        "model": {**arch, "arch": cfg.arch, "num_classes": info.num_classes,
                  "in_channels": info.channels, "image_size": info.size,
                  "model_args": cfg.model_args,
                  "input": "[0,1] images, N x C x H x W; the normalisation is inside the model",
                  "normalization": _normalization(model),
                  "state_dict": "net.<the network's own keys>, normalize.<mean, std buffers>"},
        "code": record.get("code"),
        "config_hash": stored.get("config_hash"),
        "cell_hash": record.get("cell_hash"),
    }


def _protocol(cfg: RunConfig, record: dict[str, Any], steps: int, alpha: float,
              aa_n: int) -> str:
    """The evaluation protocol in one sentence, naming the images a user can load again."""
    from .robustness.evaluation import AA_ATTACKS

    return (f"clean accuracy on the full test set; PGD-{steps} (L∞, ε = {_eps_text(cfg.eps)}, "
            f"α = {alpha:g}, one random start, eval mode, fp32) on a fixed subset of "
            f"{record.get('eval_n')} test images (load_test_images(run, subset='pgd'))"
            + (f"; standard AutoAttack ({record.get('aa_package')}: {AA_ATTACKS}) on a "
               f"fixed {aa_n} of them (load_test_images(run, subset='aa'); not the "
               f"first {aa_n} of the PGD images)" if aa_n else "; AutoAttack not run"))


def _footnote(cfg: RunConfig, record: dict[str, Any], select: str, measured: bool) -> str:
    """What a reader must know before comparing: a stand-in, and which epoch's weights."""
    footnote = "" if cfg.scale == "paper" else (
        f"{cfg.scale}-scale stand-in, not the paper's setting: {cfg.dataset}, {cfg.arch} "
        "(see the experiment file paper_repro/experiments/"
        f"{cfg.experiment}.toml). ")
    if not measured:
        footnote += ("Weights of the run's best epoch (best.pt): the record's accuracies are the "
                     "final model's, so none are given here. ")
    elif select == "best":
        footnote += (f"Weights of the run's best epoch ({record['best_epoch']} of "
                     f"{record.get('epochs_done')}: the highest PGD-{record.get('val_steps')} "
                     f"accuracy on {record.get('val_n')} validation images held out of "
                     "training). ")
    return footnote


def model_card(info: dict[str, Any]) -> str:
    """README.md of an export: what the model is, how it was measured, how to load it."""
    def pct(v: Any) -> str:
        return "not measured" if v is None else f"{v:.2f}%"

    ev, tr, m = info["evaluation"], info["training"], info["model"]
    code = info.get("code") or {}
    sha = code.get("git_sha", "unknown") + (" (dirty)" if code.get("git_dirty") else "")
    lines = [
        f"# {info['name']}", "",
        f"An L∞-robust image classifier trained by the AFT reproduction suite (paper_repro), "
        f"run `{tr['run']}`: method {tr['label']} (`{tr['method']}`), {m['arch']} on "
        f"{info['dataset']}, ε = {info['eps']}.", "",
        "| | |", "|---|---|",
        f"| clean accuracy | {pct(info['clean_acc'])} ({ev['clean_n']} test images) |",
        f"| PGD-{ev['pgd_steps']} accuracy | {pct(info['reported'])} ({ev['pgd_n']} images) |",
        f"| AutoAttack accuracy | {pct(info['autoattack_acc'])} ({ev['aa_n']} images) |",
        f"| threat model | {info['threat_model']}, ε = {info['eps']} |",
        f"| architecture | `{m['architecture']}` ({m['library']}) |",
        f"| training | {tr['label']}, {tr['epochs_done']} epochs, train ε = {tr['train_eps']:g}, "
        f"{tr['weights']} |",
        f"| gradient-masking checks | {ev['checks']} |",
        f"| config hash | `{info['config_hash']}` |",
        f"| code | `{sha}` |",
        f"| weights | `{WEIGHTS}`, sha256 `{info['weights']['sha256']}` |", "",
        f"Evaluation protocol: {ev['protocol']}.", "",
    ]
    if info["footnote"]:
        lines += [f"Note: {info['footnote']}", ""]
    lines += [
        "## Use", "",
        "```python",
        "import paper_repro",
        "model = paper_repro.load_model(\"THIS_FOLDER\")  # eval mode; checks the sha256",
        "logits = model(images)  # images: float in [0,1], N x C x H x W",
        "# the images each number above is measured on (no argument: clean, all test images):",
        "x, y = paper_repro.load_test_images(\"THIS_FOLDER\", subset=\"aa\")  # or subset=\"pgd\"",
        "```", "",
        f"Without this suite: `{WEIGHTS}` is a safetensors file of the whole model's state dict: "
        f"`net.*` is the network's own state dict (`{m['build']}`) and `normalize.*` its input "
        f"normalisation ({m['normalization']['kind']}), applied to [0,1] images before the "
        "network.", "",
        f"The full recipe, the evaluation details and the provenance are in `{INFO}`.", "",
    ]
    return "\n".join(lines)
