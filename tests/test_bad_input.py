"""The bad-input catalogue: each wrong input gives one clear line on stderr, a non-zero exit,
and leaves every file already in the results store exactly as it was (bytes and mtime).

The CLI runs in-process (`cli.main(argv)`) against a store that already holds a finished run.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from paper_repro import cli
from paper_repro.models import create_model
from test_data import _cifar_rows, _write_cifar10, _write_fashion, _write_pickle

TINY = ["--method", "natural", "--arch", "cnn-small", "--set", "model_args.width=4",
        "--dataset", "cifar10", "--train-subset", "24", "--batch-size", "8", "--epochs", "1",
        "--eval-n", "8", "--set", "eval_steps=1", "--set", "monitor_n=0", "--device", "cpu",
        "--scale", "smoke"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data root, a store holding one finished run, and a folder of broken inputs."""
    base = tmp_path_factory.mktemp("bad_input")
    root, store, bad = base / "data", base / "results", base / "bad"
    _write_cifar10(str(root / "cifar-10-batches-py"), per_batch=6, test=8)
    assert cli.main(["run", *TINY, "--data-root", str(root), "--results-dir", str(store)]) == 0
    checkpoint = store / "runs" / "smoke" / "adhoc" / "natural" / "seed0" / "checkpoint.pt"
    bad.mkdir()
    (bad / "truncated.pt").write_bytes(checkpoint.read_bytes()[:2000])
    torch.save(torch.nn.Linear(2, 2), bad / "full_pickle.pt")  # unpickling would run code
    other = create_model("cnn-medium", num_classes=10, in_channels=3,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.save(other.state_dict(), bad / "other_arch.pt")
    (bad / "malformed.toml").write_text('title = "x"\n[[rows]\nid = "a"\n')
    (bad / "unknown_key.toml").write_text('[[rows]]\nid = "a"\nmethod = "natural"\ncolour = 1\n')
    # a CIFAR folder whose files are not pickles, one cut short, one with labels out of range
    for name in ("wrong_format", "truncated", "bad_labels"):
        shutil.copytree(root, bad / name)
    for f in (bad / "wrong_format" / "cifar-10-batches-py").iterdir():
        f.write_bytes(b"this is not a pickle\n" * 10)
    batch = bad / "truncated" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    rng = np.random.default_rng(0)
    _write_pickle(str(bad / "bad_labels" / "cifar-10-batches-py" / "data_batch_1"),
                  {b"labels": [0, 1, 2, 3, 4, 12], b"data": _cifar_rows(rng, 6),
                   b"batch_label": b"x", b"filenames": [b"x.png"] * 6})
    _write_fashion(str(bad / "fashion_truncated"), "train", truncate_images=100)
    _write_fashion(str(bad / "fashion_truncated"), "t10k")
    ro = bad / "read_only_store"
    shutil.copytree(store, ro)
    return {"root": root, "store": store, "bad": bad, "ckpt": checkpoint, "ro": ro}


def _run(world, *extra):
    """A new run (row `probe`) in the store, with `extra` flags last (the last flag wins)."""
    return ["run", *TINY, "--name", "probe", "--data-root", str(world["root"]),
            "--results-dir", str(world["store"]), *extra]


def _finetune(world, *extra):
    return ["finetune", *TINY, "--data-root", str(world["root"]), "--results-dir",
            str(world["store"]), *extra]


# (case id, argv builder, a fragment the one error line must contain)
CASES = [
    # names
    ("unknown-method", lambda w: _run(w, "--method", "no_such_method"),
     "unknown method 'no_such_method'"),
    ("unknown-arch", lambda w: _run(w, "--arch", "vit-huge"), "unknown model 'vit-huge'"),
    ("unknown-dataset", lambda w: _run(w, "--dataset", "mnist-color"), "unknown dataset"),
    ("unknown-scale", lambda w: _run(w, "--scale", "huge"), "invalid choice: 'huge'"),
    ("unknown-device", lambda w: _run(w, "--device", "tpu"), "unknown device 'tpu'"),
    ("unknown-schedule", lambda w: _run(w, "--set", "schedule=zigzag"), "zigzag"),
    ("unknown-optimizer", lambda w: _run(w, "--set", "optimizer=rmsprop"), "rmsprop"),
    ("unknown-experiment", lambda w: ["sweep", "table7", "--results-dir", str(w["store"])],
     "no experiment file 'table7'"),
    ("unknown-row", lambda w: _run(w, "--experiment", "table1", "--row", "nope"),
     "has no row 'nope'"),
    ("unknown-flag", lambda w: _run(w, "--colour", "blue"), "unrecognized arguments: --colour"),
    # numbers out of range
    ("eps-negative", lambda w: _run(w, "--eps", "-0.1"), "eps must be in [0, 1]"),
    ("eps-above-one", lambda w: _run(w, "--eps", "2"), "eps must be in [0, 1]"),
    ("eps-not-a-number", lambda w: _run(w, "--eps", "eight"), "eps: expected a number"),
    ("eps-divide-by-zero", lambda w: _run(w, "--eps", "8/0"), "eps: expected a number"),
    ("eval-alpha-zero", lambda w: _run(w, "--set", "eval_alpha=0"), "eval_alpha must be in"),
    ("eval-alpha-negative", lambda w: _run(w, "--set", "eval_alpha=-0.01"),
     "eval_alpha must be in"),
    ("train-alpha-above-one", lambda w: _run(w, "--method", "pgd_at", "--set",
                                             "method_args.alpha=1.5"), "alpha must be in (0, 1]"),
    ("train-steps-zero", lambda w: _run(w, "--method", "pgd_at", "--set",
                                        "method_args.steps=0"), "steps must be >= 1"),
    ("train-steps-not-a-number", lambda w: _run(w, "--method", "pgd_at", "--set",
                                                "method_args.steps=abc"),
     "method 'pgd_at': method_args.steps: expected an integer"),
    ("schedule-argument-not-a-number", lambda w: _run(w, "--set", "schedule=piecewise", "--set",
                                                      "schedule_args.gamma=abc"),
     "schedule 'piecewise': bad arguments"),
    ("schedule-unknown-argument", lambda w: _run(w, "--set", "schedule_args.colour=1"),
     "unexpected keyword argument 'colour'"),
    ("model-unknown-option", lambda w: _run(w, "--set", "model_args.depth=3"),
     "unknown option(s) depth"),
    ("epochs-zero", lambda w: _run(w, "--epochs", "0"), "epochs must be >= 1"),
    ("epochs-not-an-int", lambda w: _run(w, "--epochs", "two"), "invalid int value: 'two'"),
    ("lr-negative", lambda w: _run(w, "--lr", "-0.1"), "lr must be > 0"),
    ("batch-size-zero", lambda w: _run(w, "--batch-size", "0"), "batch_size must be >= 1"),
    ("seeds-zero", lambda w: _run(w, "--seeds", "0"), "--seeds must be >= 1"),
    ("train-subset-too-large", lambda w: _run(w, "--train-subset", "100000"),
     "exceeds the 30 training images"),
    # config keys and files
    ("unknown-config-key", lambda w: _run(w, "--set", "colour=blue"),
     "unknown config key 'colour'"),
    ("unknown-method-setting", lambda w: _run(w, "--method", "pgd_at", "--set",
                                              "method_args.colour=1"), "unknown setting(s) colour"),
    ("set-without-equals", lambda w: _run(w, "--set", "deterministic"), "--set expects key=value"),
    ("wrong-type", lambda w: _run(w, "--set", "deterministic=maybe"), "expected true or false"),
    ("malformed-toml", lambda w: _run(w, "--experiment", str(w["bad"] / "malformed.toml")),
     "malformed TOML"),
    ("toml-unknown-key", lambda w: _run(w, "--experiment", str(w["bad"] / "unknown_key.toml")),
     "unknown config key 'colour'"),
    # data
    ("data-root-missing", lambda w: _run(w, "--data-root", str(w["bad"] / "nowhere")),
     "no torchvision-format batches"),
    ("data-wrong-format", lambda w: _run(w, "--data-root", str(w["bad"] / "wrong_format")),
     "cifar10"),
    ("data-truncated", lambda w: _run(w, "--data-root", str(w["bad"] / "truncated")),
     "cifar10"),
    ("labels-out-of-range", lambda w: _run(w, "--data-root", str(w["bad"] / "bad_labels")),
     "labels in"),
    ("fashion-idx-truncated", lambda w: _run(w, "--dataset", "fashion-mnist", "--data-root",
                                             str(w["bad"] / "fashion_truncated")), "fashion-mnist"),
    # checkpoints and --init
    ("init-truncated", lambda w: _finetune(w, "--init", str(w["bad"] / "truncated.pt")),
     "truncated checkpoint"),
    ("init-other-arch", lambda w: _finetune(w, "--init", str(w["bad"] / "other_arch.pt")),
     "does not fit architecture"),
    ("init-full-pickle", lambda w: _finetune(w, "--init", str(w["bad"] / "full_pickle.pt")),
     "refused, it is a full pickle"),
    ("init-unknown-prefix", lambda w: _finetune(w, "--init", "foo:bar"), "unknown prefix 'foo:'"),
    ("init-missing-file", lambda w: _finetune(w, "--init", str(w["bad"] / "none.pt")),
     "checkpoint not found"),
    ("init-unknown-run", lambda w: _finetune(w, "--init", "run:smoke/adhoc/nope/seed0"),
     "no checkpoint at"),
    ("finetune-without-init", lambda w: _finetune(w), "finetune needs --init"),
    ("resume-nothing", lambda w: _run(w, "--name", "fresh", "--resume"), "nothing to resume"),
    ("other-config-same-run", lambda w: _run(w, "--name", "natural", "--lr", "0.05"),
     "holds a run with another config"),
    # the store and the cluster
    ("results-read-only", lambda w: ["run", *TINY, "--name", "new", "--data-root",
                                     str(w["root"]), "--results-dir", str(w["ro"])],
     "is not writable"),
    ("results-is-a-file", lambda w: _run(w, "--results-dir", str(w["ckpt"])), "is not a folder"),
    ("slurm-without-slurm", lambda w: ["sweep", "table1", "--scale", "smoke", "--slurm",
                                       "--results-dir", str(w["store"])], "no SLURM found"),
    ("slurm-flag-without-slurm", lambda w: ["sweep", "table1", "--scale", "smoke", "--partition",
                                            "gpu", "--results-dir", str(w["store"])],
     "--partition only applies with --slurm"),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its bytes' hash, mode and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def _make_read_only(folder: Path) -> None:
    """A folder that no one may write, root included: chattr +i where we are root."""
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True).returncode:
            pytest.skip("root, and no immutable attribute on this file system")
    else:
        for d in dirs:
            d.chmod(0o555)


def _make_writable(folder: Path) -> None:
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", *map(str, dirs)], capture_output=True)
    else:
        for d in dirs:
            d.chmod(0o755)


@pytest.mark.parametrize("case, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, case, argv, message, capsys,
                                                  monkeypatch):
    monkeypatch.delenv("REPRO_DATA", raising=False)
    if case.startswith("slurm"):
        monkeypatch.setenv("PATH", str(world["bad"]))  # no srun anywhere
    if case == "fashion-idx-truncated":  # the Debian copy must not stand in for the bad one
        monkeypatch.setattr("paper_repro.data.idx.FASHION_MNIST_DEBIAN_DIR", str(world["bad"]))
    stores = [world["store"], world["ro"]]
    before = [_snapshot(s) for s in stores]
    if case == "results-read-only":
        _make_read_only(world["ro"])
    capsys.readouterr()
    try:
        try:
            code = cli.main(argv(world))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    finally:
        if case == "results-read-only":
            _make_writable(world["ro"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert [_snapshot(s) for s in stores] == before


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
