"""docs/adding-a-method.md done for real (issue 24, item 3): the page's FGSM AT file, kept in a
folder outside the repository and named by REPRO_PLUGINS, is a registered method; the page's
run trains it; and the page's pytest command collects it in every check that covers every
method (the fast path, the probes, plan, the mechanics) and passes, with no list edited
anywhere: those tests read the registry. `bench --all` picks it up the same way, and the
local pool's jobs find it through the environment they inherit."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import doc_example

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "adding-a-method.md"
NAME = "fgsm_at"
# The checks that cover every registered method: test file -> its every-method tests
EVERY_METHOD_CHECKS = {
    "tests/test_fastpath_methods.py": (
        "test_bf16_autocast_trains_every_method_on_the_cpu",
        "test_channels_last_trains_every_method_in_nhwc",
        "test_compiled_training_does_not_recompile_or_compute_weight_gradients_in_attacks"),
    "tests/test_fastpath.py": ("test_bench_probes_every_method",),
    "tests/test_plan.py": ("test_every_method_is_planned_as_it_trains",),
    "tests/test_models.py": ("test_mlp_trains_under_every_method",),
    "tests/test_runner.py": ("test_resume_gives_the_same_final_metrics",),
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict[str, str]:
    """The page's method file as my_methods/fgsm_at.py; the environment that registers it."""
    folder = tmp_path_factory.mktemp("plugin") / "my_methods"
    folder.mkdir()
    (folder / f"{NAME}.py").write_text(doc_example(DOC, "method-file"))
    return {**os.environ, "REPRO_PLUGINS": NAME,
            "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def _bash_lines(doc: Path) -> list[str]:
    """The lines of the page's ```bash blocks."""
    blocks = doc.read_text().split("```bash\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines()]


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def test_the_file_registers_the_method_and_the_pages_run_trains_it(plugin, tmp_path):
    listed = subprocess.run([sys.executable, "-m", "paper_repro", "--list"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=plugin)
    assert listed.returncode == 0 and NAME in listed.stdout, listed.stderr
    run = _python(doc_example(DOC, "method-run"), plugin, tmp_path)
    if run.returncode and "Fashion-MNIST" in run.stderr:
        pytest.skip("Fashion-MNIST not installed")
    assert run.returncode == 0, run.stderr[-3000:]
    status, clean, pgd = run.stdout.split()
    assert status == "done" and 0 <= float(pgd) <= float(clean) <= 100
    assert (tmp_path / "results" / "runs" / "smoke" / "example" / NAME / "seed0" /
            "record.json").exists()
    # bench --all's grid is the registry's: the new method on every grid network
    grid = _python("from paper_repro.perf import bench\n"
                   "print(sorted({a for m, a, _b, _l in bench.grid() if m == 'fgsm_at'}))",
                   plugin, tmp_path)
    assert grid.returncode == 0, grid.stderr
    assert grid.stdout.strip() == repr(sorted(("preact-resnet18", "wrn-28-10", "wrn-34-10")))


def test_the_pools_jobs_register_it_from_the_environment(plugin, tmp_path):
    """Two seeds at once through the local pool: each job is a new process that finds the
    method through the REPRO_PLUGINS it inherited."""
    done = subprocess.run(
        [sys.executable, "-m", "paper_repro", "run", "--method", NAME, "--scale", "paper",
         "--dataset", "fashion-mnist", "--arch", "mlp", "--set", "model_args.width=32",
         "--epochs", "1", "--train-subset", "256", "--set", "eval_n=50", "--set", "aa_n=0",
         "--set", "eval_checks=false", "--seeds", "2", "--jobs", "2",
         "--results-dir", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=plugin)
    if done.returncode and "Fashion-MNIST" in done.stderr:
        pytest.skip("Fashion-MNIST not installed")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 at a time" in done.stdout
    for seed in (0, 1):
        record = tmp_path / "store" / "runs" / "paper" / "adhoc" / NAME / f"seed{seed}" / \
            "record.json"
        assert json.loads(record.read_text())["status"] == "done"


def test_without_the_plugin_it_is_unknown_and_a_missing_plugin_is_one_line(plugin, tmp_path):
    args = [sys.executable, "-m", "paper_repro", "run", "--method", NAME, "--scale", "smoke"]
    without = {k: v for k, v in plugin.items() if k != "REPRO_PLUGINS"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=without)
    assert done.returncode == 2 and f"unknown method '{NAME}'" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    missing = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**plugin, "REPRO_PLUGINS": "no_such_module"})
    assert missing.returncode == 2 and "REPRO_PLUGINS: no module 'no_such_module'" in \
        missing.stderr and missing.stderr.strip().count("\n") == 0
    assert not (tmp_path / "results").exists()


def test_each_check_that_covers_every_method_collects_it_and_it_passes(plugin, tmp_path):
    """The page's pytest command, verbatim, plus a report file (and no cache in the repo)."""
    command = next(line for line in _bash_lines(DOC) if "pytest" in line)
    words = shlex.split(command)
    env_words = [w for w in words if "=" in w and w.split("=")[0].isupper()]
    assert dict(w.split("=", 1) for w in env_words)["REPRO_PLUGINS"] == NAME
    report = tmp_path / "report.xml"
    argv = [sys.executable, *words[len(env_words) + 1:], f"--junitxml={report}",
            "-p", "no:cacheprovider", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=plugin)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran = {}
    for case in cases:
        outcome = [child.tag for child in case]  # failure, error or skipped; none when passed
        ran[(case.get("file") or case.get("classname"), case.get("name"))] = outcome
    for test_file, functions in EVERY_METHOD_CHECKS.items():
        module = Path(test_file).stem
        for function in functions:
            hits = [outcome for (where, name), outcome in ran.items()
                    if module in where and name.startswith(f"{function}[") and NAME in name]
            assert hits, f"{test_file}::{function} did not collect {NAME}"
            assert all(not outcome for outcome in hits), (function, hits)
    assert all(NAME in name for _where, name in ran)  # -k selected the new method's cases only
