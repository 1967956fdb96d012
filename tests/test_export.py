"""export.py: a trained run out of the store — loaded for attacks, exported, re-loaded elsewhere."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paper_repro import cli, export, load_model, load_test_images, model_card, results
from paper_repro.orchestration import local
from paper_repro.config import build_config
from paper_repro.errors import CheckpointError, DataError, ReproError
from paper_repro.robustness.evaluation import fixed_subset
from paper_repro.models.registry import Normalize
from conftest import doc_example, tiny_config

REPO = Path(__file__).resolve().parent.parent
RUN = "smoke/table1/aft/seed0"


@pytest.fixture(scope="module")
def aft_store(tmp_path_factory):
    """A tiny AFT run (and its natural pre-training) trained into a scratch store."""
    store = tmp_path_factory.mktemp("store")
    cfg = tiny_config(store, method="aft", experiment="table1", pretrain={"epochs": 1})
    try:
        record = local.train_with_prerequisites(cfg, quiet=True)  # its pre-training first
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    assert record["run_path"] == RUN and record["status"] == "done"
    return store, record, cfg


@pytest.fixture(scope="module")
def exported(aft_store, tmp_path_factory):
    store, _record, _cfg = aft_store
    out = tmp_path_factory.mktemp("exports") / "aft"
    assert cli.main(["export", RUN, "--out", str(out), "--results-dir", str(store)]) == 0
    return out


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Clean accuracy as the record computes it (evaluation._pct over eval_batch batches)."""
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(y), batch)])
    return 100.0 * (pred == y).sum().item() / len(y)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_load_model_is_the_trained_network_in_eval_mode_taking_unit_range_images(aft_store):
    store, record, cfg = aft_store
    model = load_model(RUN, results_dir=store)
    assert not model.training and isinstance(model.normalize, Normalize)  # mean/std inside
    x, y = load_test_images(RUN, results_dir=store)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and len(y) == 10_000
    assert _accuracy(model, x, y, cfg.eval_batch) == record["clean_acc"]  # the record's model
    folder = results.run_dir(store, RUN)
    for other in (load_model(folder), load_model(f"run:{RUN}", results_dir=store)):
        assert torch.equal(other(x[:64]), model(x[:64]))
    sub_x, sub_y = load_test_images(RUN, n=cfg.eval_n, results_dir=store)
    assert len(sub_y) == cfg.eval_n == record["eval_n"]
    assert torch.equal(sub_x, x[fixed_subset(10_000, cfg.eval_n)])  # the record's PGD images


def test_an_export_reloaded_in_a_fresh_process_gives_the_records_clean_accuracy(aft_store,
                                                                                exported):
    _store, record, _cfg = aft_store
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "model.safetensors",
                                                          "model_info.json"]
    info = json.loads((exported / "model_info.json").read_text())
    script = ("import json, sys, torch, paper_repro\n"
              "model = paper_repro.load_model(sys.argv[1])\n"
              "x, y = paper_repro.load_test_images(sys.argv[1])\n"
              "b = json.load(open(sys.argv[1] + '/model_info.json'))['evaluation']['batch']\n"
              "with torch.no_grad():\n"
              "    pred = torch.cat([model(x[i:i + b]).argmax(1) for i in range(0, len(y), b)])\n"
              "print(json.dumps({'n': len(y), 'acc': 100.0 * (pred == y).sum().item() / len(y),"
              " 'training': model.training}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(exported)], capture_output=True,
                          text=True, timeout=300, cwd=exported.parent,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["acc"] == record["clean_acc"] == info["clean_acc"]  # exactly, same images
    assert got["n"] == info["evaluation"]["clean_n"] == 10_000 and got["training"] is False


def test_model_info_has_robustbench_fields_and_the_card_says_how_it_was_measured(aft_store,
                                                                                exported):
    _store, record, cfg = aft_store
    info = json.loads((exported / "model_info.json").read_text())
    for key in ("name", "link", "dataset", "architecture", "eps", "clean_acc", "reported",
                "autoattack_acc", "additional_data", "number_forward_passes", "footnote"):
        assert key in info, key
    assert (info["threat_model"], info["eps"], info["dataset"]) == ("Linf", "0.1", "fashion-mnist")
    assert info["reported"] == record["pgd_acc"] and info["autoattack_acc"] is None  # aa_n = 0
    assert info["pgd20_acc"] is None  # tiny runs use PGD-3, which is not PGD-20
    assert info["evaluation"]["pgd_n"] == cfg.eval_n and info["evaluation"]["aa_n"] == 0
    assert info["config_hash"] == cfg.config_hash() and info["code"] == record["code"]
    assert info["training"]["method"] == "aft" and info["training"]["recipe"]["optimizer"] == "adam"
    assert info["model"]["build"].startswith("paper_repro.create_model('cnn-small'")
    assert info["weights"]["sha256"] == export._sha256(exported / "model.safetensors")
    card = (exported / "README.md").read_text()
    assert info["weights"]["sha256"] in card and "PGD-3" in card and "stand-in" in card


def test_library_architectures_are_named_so_their_library_rebuilds_them():
    import timm
    import torchvision

    from paper_repro.models import create_model

    for arch, rebuild in (("torchvision:resnet18", torchvision.models.get_model),
                          ("timm:resnet18", timm.create_model)):
        named = model_card._architecture(build_config(("t", {"arch": arch})), 10, 3)
        assert named["architecture"] == "resnet18" and named["library"] == arch.split(":")[0]
        assert named["build"].endswith("('resnet18', num_classes=10)")
        ours = create_model(arch, num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.2,) * 3)
        net = {k.removeprefix("net."): v for k, v in ours.state_dict().items()
               if k.startswith("net.")}
        rebuild(named["architecture"], num_classes=10).load_state_dict(net)  # strict


def test_a_tampered_weights_file_is_refused_with_one_line(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    load_model(copy)  # intact: loads
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* differs from model_info.json") as e:
        load_model(copy)
    assert "\n" not in str(e.value)
    weights.write_bytes(bytes(data[:len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(copy)


def test_select_best_needs_a_best_checkpoint(aft_store, tmp_path, capsys):
    store, _record, _cfg = aft_store
    scratch = tmp_path / "results"
    shutil.copytree(store, scratch)
    argv = ["export", RUN, "--select", "best", "--results-dir", str(scratch)]
    assert cli.main([*argv, "--out", str(tmp_path / "best")]) == 2
    assert "has no best.pt" in _one_error_line(capsys)
    folder = results.run_dir(scratch, RUN)
    shutil.copy(folder / "checkpoint.pt", folder / "best.pt")
    assert not load_model(RUN, select="best", results_dir=scratch).training
    assert cli.main([*argv, "--out", str(tmp_path / "best")]) == 0
    info = json.loads((tmp_path / "best" / "model_info.json").read_text())
    assert info["clean_acc"] is None and "best.pt" in info["footnote"]  # never the final's numbers


def _break_checkpoint_with_a_full_pickle(folder: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), folder / "checkpoint.pt")  # a whole zip, but a pickle


@pytest.mark.parametrize("damage, message", [
    (None, "is neither an exported folder"),
    (lambda d: (d / "checkpoint.pt").unlink(), "no checkpoint.pt"),
    (lambda d: (d / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes()[:5000]),
     "not a whole checkpoint"),
    (_break_checkpoint_with_a_full_pickle, "refused, it is a full pickle"),
    (lambda d: results.write_record(d, {"status": "running"}), "is not done (running)"),
    (lambda d: (d / "record.json").write_text('{"status": "do'), "unreadable JSON"),
    ("out", "exists and is not an empty folder"),
])
def test_bad_export_input_gives_one_line_and_exit_2(aft_store, tmp_path, capsys, damage, message):
    store, _record, _cfg = aft_store
    scratch = tmp_path / "results"
    shutil.copytree(store, scratch)
    out = tmp_path / "out"
    run = RUN
    if damage is None:
        run = "cpu/table1/aft/seed7"
    elif damage == "out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        damage(results.run_dir(scratch, RUN))
    assert cli.main(["export", run, "--out", str(out), "--results-dir", str(scratch)]) == 2
    assert message in _one_error_line(capsys)
    if damage == "out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]  # nothing overwritten
    else:
        assert not out.exists()


def test_a_missing_checkpoint_says_which_command_trains_it(aft_store, tmp_path):
    store, _record, _cfg = aft_store
    scratch = tmp_path / "results"
    shutil.copytree(store, scratch)
    (results.run_dir(scratch, RUN) / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(RUN, results_dir=scratch)
    assert "python -m paper_repro run --experiment table1 --row aft --scale smoke" in str(e.value)


def _readme_example() -> str:
    """The docs' load-attack-export example (docs/api.md): the python block after its marker."""
    return doc_example(REPO / "docs" / "api.md", "load-attack-export")


def test_the_readme_example_runs(aft_store, tmp_path):
    """The README's example, verbatim, in a folder whose results/ holds a trained AFT run at
    the path it names (the tiny smoke run standing in for the cpu one)."""
    store, _record, _cfg = aft_store
    code = _readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 6, lines  # an import line and five
    named = re.search(r'"(cpu/table1/aft/seed0)"', code).group(1)
    shutil.copytree(results.run_dir(store, RUN), tmp_path / "results" / "runs" / named)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"PGD-20 accuracy: \d+\.\d%", proc.stdout), proc.stdout
    out = next(p.parent for p in tmp_path.glob("**/model_info.json"))
    assert not load_model(out).training


def test_the_autoattack_images_are_the_ones_the_records_aa_clean_acc_is_measured_on(aft_store,
                                                                                    tmp_path):
    """load_test_images(run, subset="aa") gives the images of the record's AutoAttack numbers
    (not the first aa_n PGD images): the model's clean accuracy on them is aa_clean_acc."""
    cfg = tiny_config(tmp_path, method="natural", experiment="table1", eval_n=40, aa_n=20)
    record = local.train_with_prerequisites(cfg, quiet=True)
    run = record["run_path"]
    model = load_model(run, results_dir=tmp_path)
    x, y = load_test_images(run, subset="aa", results_dir=tmp_path)
    assert len(y) == record["aa_n"] == 20
    assert _accuracy(model, x, y, cfg.eval_batch) == record["aa_clean_acc"]
    assert torch.equal(x, load_test_images(run, n=20, results_dir=tmp_path)[0])
    pgd_x, pgd_y = load_test_images(run, subset="pgd", results_dir=tmp_path)
    assert len(pgd_y) == record["eval_n"] == 40
    assert not torch.equal(x, pgd_x[:20])  # the trap the docs warn about
    for kwargs, error in [({"subset": "bogus"}, "not one of pgd, aa"),
                          ({"subset": "aa", "n": 20}, "not both")]:
        with pytest.raises(ReproError, match=error):
            load_test_images(run, results_dir=tmp_path, **kwargs)
    store, _record, _cfg = aft_store  # trained with aa_n = 0
    with pytest.raises(ReproError, match="no AutoAttack result"):
        load_test_images(RUN, subset="aa", results_dir=store)
    out = tmp_path / "exported"
    export.export_model(run, out, results_dir=tmp_path)
    assert torch.equal(load_test_images(out, subset="aa")[0], x)
    assert "subset=\"aa\"" in (out / "README.md").read_text()
