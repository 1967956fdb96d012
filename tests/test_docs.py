"""README.md and docs/: result blocks are what the store renders, links resolve, prose numbers
are rendered cells, and every command and code block is parsed or run."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from paper_repro import cli, results
from paper_repro.errors import DataError, ReproError
from paper_repro.report import docs

REPO = Path(__file__).resolve().parent.parent
FILES = docs.doc_files(REPO)
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```",
                   re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
LANGS = {"bash", "python", "toml", "text"}
# `<!-- example: NAME (tests/test_X.py runs this block) -->`: another test runs the block
# verbatim (conftest.doc_example), with checks of its own
RUN_ELSEWHERE = re.compile(r"<!-- example: (?P<name>[\w-]+) \((?P<test>tests/test_\w+\.py) "
                           r"runs this block\) -->\s*$")
SHELL_TOOLS = {"sudo", "eval", "sinfo", "squeue", "sacct", "tensorboard"}  # not ours to parse


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, dedented body, the 200 characters before it) of every fenced block."""
    text = path.read_text()
    return [(m["lang"], textwrap.dedent(m["body"]) if m["indent"] else m["body"],
             text[max(0, m.start() - 200):m.start()]) for m in BLOCK.finditer(text)]


# --- item 3: blocks from the store, links, prose numbers -----------------------------------

def test_readme_is_one_screen_and_docs_have_the_pages():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert {"scales.md", "evaluation.md", "methods.md", "assumptions.md", "results.md",
            "pools.md", "speed.md", "store.md", "api.md", "adding-a-method.md",
            "troubleshooting.md", "reproduce.md"} <= pages


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_every_marked_block_is_what_the_store_renders(path):
    text = path.read_text()
    rendered = docs.rewrite(text, REPO / "results")
    differing = [f"<!-- {a['name']}:{a['scale']} -->" for a, b in
                 zip(docs.MARKED.finditer(text), docs.MARKED.finditer(rendered))
                 if a.group(0) != b.group(0)]
    assert not differing, (f"{_name(path)}: {', '.join(differing)} differ from the store; "
                           "run `python -m paper_repro aggregate` (never edit them by hand)")


def test_a_hand_edited_block_fails_and_aggregate_writes_it_back(tmp_path):
    for part in ("README.md", "docs", "results/tables", "results/bench"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, tmp_path / part)
    readme = tmp_path / "README.md"
    committed = readme.read_text()
    assert docs.update_docs(tmp_path) == []  # nothing changes: byte-stable
    edited = committed.replace("| AFT | 73.69 ± 0.38 |", "| AFT | 75.00 ± 0.38 |")
    assert edited != committed
    readme.write_text(edited)
    assert docs.rewrite(edited, tmp_path / "results") != edited  # what the test above checks
    assert docs.update_docs(tmp_path) == [readme]
    assert readme.read_text() == committed


def test_a_table_not_rendered_yet_leaves_one_line_and_an_unknown_one_fails(tmp_path):
    line = docs.render_block("modern", "cpu", tmp_path)
    assert line == ("_Not rendered yet: `results/tables/cpu/modern.md` does not exist (train "
                    "its runs, then `python -m paper_repro aggregate`)._\n")
    with pytest.raises(ReproError, match="no such table"):
        docs.render_block("tabel1", "cpu", tmp_path)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_every_link_and_image_points_to_a_file_that_exists(path):
    text = BLOCK.sub("", path.read_text())  # links in code are code
    broken = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_name(path)}: broken links: {', '.join(broken)}"


# Setup values (not results) that the results pages state in prose: ε, the LR YOPO trains at.
SETUP_NUMBERS = {"0.1", "0.125", "0.4", "0.2", "0.05", "0.02"}


@pytest.mark.parametrize("name", ["README.md", "docs/results.md"])
def test_numbers_in_results_prose_are_rendered_cells(name):
    """A decimal in the prose of the results pages quotes a cell of a rendered table."""
    number = re.compile(r"(?<![\w.])[-+]?\d+\.\d+")
    cells = set()
    for table in (REPO / "results" / "tables").glob("*/*.md"):
        cells |= set(number.findall("\n".join(ln for ln in table.read_text().splitlines()
                                              if ln.startswith("|"))))
    prose = docs.MARKED.sub("", BLOCK.sub("", (REPO / name).read_text()))
    prose = re.sub(r"`[^`]*`|\]\([^)]*\)|Python ≥ [\d.]+", "", prose)  # code, links, versions
    typed = sorted(set(number.findall(prose)) - cells - SETUP_NUMBERS)
    assert not typed, f"{name}: numbers typed by hand, not rendered cells: {', '.join(typed)}"


# --- item 5: every command and code block is parsed or run --------------------------------

def _reproduce_targets() -> set[str]:
    text = (REPO / "reproduce.sh").read_text()
    return {t for labels in re.findall(r"^  ([a-z0-9_|]+)\)", text, re.M)
            for t in labels.split("|")}


def _commands(script: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments dropped, `;` split."""
    out: list[str] = []
    for line in script.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for word in shlex.split(line, comments=True) + [";"]:
            if word.endswith(";"):
                command += [word[:-1]] if word[:-1] else []
                if command:
                    out.append(shlex.join(command))
                command = []
            else:
                command.append(word)
    return out


def _argv(words: list[str]) -> list[str]:
    """Doc notation to argv: [optional] groups and `...` dropped, a|b takes a."""
    text = " ".join(words)
    while re.search(r"\[[^\[\]]*\]", text):
        text = re.sub(r"\s*\[[^\[\]]*\]", "", text)
    return [w.split("|")[0] if "|" in w and not w.startswith("-") else w
            for w in text.split() if w not in ("...", "…")]


def _parse(argv: list[str]) -> None:
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"argparse refuses: {' '.join(argv)}") from e


def check_command(command: str, targets: set[str]) -> None:
    """Parse one documented command with the real parsers (or check its target / tool)."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # VAR=value before the command: its environment
    if words[:3] == ["python", "-m", "paper_repro"]:
        _parse(_argv(words[3:]))
    elif words[0] == "./reproduce.sh":
        argv = _argv(words[1:])
        target = argv[0] if argv else ""
        assert target in targets, f"reproduce.sh has no target '{target}'"
        rest = [w for w in argv[1:] if w != "--fresh"]
        if target in ("aggregate", "status"):
            _parse([target, *rest])
        elif target not in ("test", "gpucheck"):
            _parse(["sweep", "table1" if target in ("fig3", "fig5", "all") else target, *rest])
    elif words[0].endswith("python") and words[1:3] == ["-m", "pytest"]:
        args = words[3:]
        for before, arg in zip([""] + args, args):
            assert arg.startswith("-") or before in ("-k", "-m") or \
                (REPO / arg.split("::")[0]).exists(), arg
    else:
        assert words[0] in SHELL_TOOLS, f"unknown command in a doc: {command}"


BASH = [(path, body) for path in FILES for lang, body, _ in _blocks(path) if lang == "bash"]


@pytest.mark.parametrize("path,body", BASH, ids=[f"{_name(p)}:{i}" for i, (p, _) in
                                                 enumerate(BASH)])
def test_every_shell_line_parses(path, body):
    targets = _reproduce_targets()
    for command in _commands(body):
        check_command(command, targets)


def test_a_broken_shell_line_fails():
    targets = _reproduce_targets()
    for bad in ("python -m paper_repro sweep table1 --scael cpu", "./reproduce.sh tabel1",
                "python -m paper_repro frobnicate", "rm -rf results",
                "REPRO_PLUGINS=x python -m paper_repro frobnicate",
                "python -m pytest tests/test_nothing.py -k x"):
        with pytest.raises(AssertionError):
            check_command(shlex.join(shlex.split(bad)), targets)


def test_every_block_says_its_language_and_toml_blocks_parse():
    for path in FILES:
        for lang, body, _ in _blocks(path):
            assert lang in LANGS, f"{_name(path)}: a ``` block without bash/python/toml/text"
            if lang == "toml":
                tomllib.loads(body)
            if lang == "text":
                assert not re.search(r"^\s*(python -m|\./reproduce\.sh)", body, re.M), \
                    f"{_name(path)}: a command in a text block"


def test_some_documented_commands_run(tmp_path):
    """A few cheap ones for real: --list, reproduce.sh's help, a smoke run into a scratch store."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in ([sys.executable, "-m", "paper_repro", "--list"],
                 ["bash", str(REPO / "reproduce.sh"), "--help"],
                 [sys.executable, "-m", "paper_repro", "run", "--experiment", "table1", "--row",
                  "natural", "--scale", "smoke", "--results-dir", str(tmp_path / "store")]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
        if proc.returncode and "Fashion-MNIST" in proc.stderr:
            pytest.skip("Fashion-MNIST not installed")
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert proc.stdout.strip()


PREAMBLE = """\
import torch
from torch.utils.data import DataLoader, TensorDataset
from paper_repro.data import load_arrays
_x, _y = load_arrays("fashion-mnist", None, train=True)
train_loader = DataLoader(TensorDataset(_x[:128].float() / 255, _y[:128]), batch_size=64)
_x, _y = load_arrays("fashion-mnist", None, train=False)
test_loader = DataLoader(TensorDataset(_x[:64].float() / 255, _y[:64]), batch_size=64)
"""


@pytest.fixture(scope="module")
def doc_store(tmp_path_factory):
    """A store holding, at the cpu paths the docs name, smoke-scale Table 1 natural and AFT runs
    (AFT with AutoAttack on 20 images), so the docs' Python blocks can run verbatim."""
    store = tmp_path_factory.mktemp("smoke")
    try:
        for row in ("natural", "aft"):
            assert cli.main(["run", "--experiment", "table1", "--row", row, "--scale", "smoke",
                             "--aa-n", "20", "--results-dir", str(store)]) == 0
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    return store


PYTHON = [(path, body, before) for path in FILES for lang, body, before in _blocks(path)
          if lang == "python"]


@pytest.mark.parametrize("path,body,before", PYTHON,
                         ids=[f"{_name(p)}:{i}" for i, (p, _, _) in enumerate(PYTHON)])
def test_every_python_block_runs(path, body, before, doc_store, tmp_path):
    elsewhere = RUN_ELSEWHERE.search(before)
    if elsewhere:  # the test it names runs it: it must exist and look the example up
        test = (REPO / elsewhere["test"]).read_text()
        assert f'"{elsewhere["name"]}"' in test, f"{elsewhere['test']} does not run {elsewhere[0]}"
        return
    for row in ("natural", "aft"):
        shutil.copytree(results.run_dir(doc_store, f"smoke/table1/{row}/seed0"),
                        tmp_path / "results" / "runs" / "cpu" / "table1" / row / "seed0")
    uses_loaders = re.search(r"\b(train|test)_loader\b", body)
    code = (PREAMBLE if uses_loaders else "") + body
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{_name(path)}:\n{body}\n{proc.stderr[-3000:]}"


def test_a_broken_python_block_fails(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import paper_repro\npaper_repro.load_modle('x')"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
