#!/usr/bin/env bash
# Thin entry point: maps a target to `python -m paper_repro ...` after making sure the
# environment (.venv with the package) and the offline data (Fashion-MNIST) are there.
#   ./reproduce.sh table1|table2|table3|modern|table1_replica [--scale smoke|cpu|paper] [more flags for `paper_repro sweep`]
#   ./reproduce.sh fig1|fig3|fig4|fig5 [--scale S]  run what a figure needs, then draw it
#   ./reproduce.sh all [--scale S]            every table and figure (train what is missing)
#     (training targets: --jobs K runs at once, default one per GPU, else one per CPU core)
#   ./reproduce.sh table1 --fresh [--seeds 1 --rows R,..]  re-run into results-fresh/ (--results-dir D), then verify against results/ (paper scale: the paper)
#   ./reproduce.sh table1 --slurm [--partition P --time HH:MM:SS ...]   submit SLURM job arrays
#   ./reproduce.sh status [table1] [--scale S]  each run: done, running, queued, failed (log), not submitted
#   ./reproduce.sh aggregate [--scale S]      rebuild tables and figures from results/ alone
#   ./reproduce.sh test [pytest args]         the test suite (what CI runs)
#   ./reproduce.sh gpucheck                   the one GPU check (<= 8 min; one line and exit 0 without a GPU)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${REPRO_VENV:-.venv}"
PY="$VENV/bin/python"

ensure_env() {
  if [ ! -x "$PY" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c 'import paper_repro, torch, torchvision, timm, pyautoattack, torchattacks, submitit, pandas, seaborn, sklearn, tabulate, tqdm, pytest, pytest_timeout, tensorboard' 2>/dev/null; then
    echo "installing the package and its dependencies into $VENV (torch brings ~6 GB of CUDA libraries; it runs on CPU too)" >&2
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[test]"
  fi
}

ensure_data() {
  if [ -n "${REPRO_DATA:-}" ] || [ -d /usr/share/datasets/fashion-mnist ]; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's dataset-fashion-mnist" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' or set REPRO_DATA" >&2
  fi
}

aggregate_flags() {  # the --scale S and --results-dir D among a target's flags, for aggregate
  while [ $# -gt 0 ]; do
    case "$1" in
      --scale|--results-dir) echo "$1 ${2:-}"; shift ;;
      --scale=*|--results-dir=*) echo "$1" ;;
    esac
    shift
  done
}

FRESH=""             # with --fresh: the re-run store (never the committed results/)
AGAINST="results"    # what a fresh re-run is compared with
VERIFY_FLAGS=()      # the --scale of the re-run, for verify

parse_fresh() {  # sets FRESH, AGAINST, VERIFY_FLAGS and ARGS (the flags for sweep)
  local fresh_dir="results-fresh" committed target_dir
  ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --fresh) ;;
      --results-dir) fresh_dir="${2:-}"; shift ;;
      --results-dir=*) fresh_dir="${1#*=}" ;;
      --against) AGAINST="${2:-}"; shift ;;
      --against=*) AGAINST="${1#*=}" ;;
      --slurm|--slurm=*)
        echo "reproduce.sh: --fresh trains here and then compares; with --slurm, submit with --results-dir D and run 'python -m paper_repro verify TABLE --results-dir D' when the jobs are done" >&2
        exit 2 ;;
      --scale) VERIFY_FLAGS+=(--scale "${2:-}"); ARGS+=("$1" "${2:-}"); shift ;;
      --scale=*) VERIFY_FLAGS+=("$1"); ARGS+=("$1") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  committed="$(realpath -m results)"
  target_dir="$(realpath -m "${fresh_dir:-results}")"
  if [ -z "$fresh_dir" ] || [ "$target_dir" = "$committed" ] || [ "${target_dir#"$committed"/}" != "$target_dir" ]; then
    echo "reproduce.sh: --fresh never writes into the committed store results/ (got --results-dir '${fresh_dir}'); choose another folder (default results-fresh)" >&2
    exit 2
  fi
  FRESH="$fresh_dir"
}

verify_fresh() {  # after a --fresh sweep: compare each experiment; exit 0 if any compared
  [ -n "$FRESH" ] || exit 0
  local status=2 experiment
  for experiment in "$@"; do
    if "$PY" -m paper_repro verify "$experiment" --results-dir "$FRESH" --against "$AGAINST" \
        ${VERIFY_FLAGS[@]+"${VERIFY_FLAGS[@]}"}; then
      status=0
    fi
  done
  exit "$status"
}

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

target="${1:-}"
[ $# -gt 0 ] && shift
case "$target" in
  table1|table2|table3|modern|table1_replica|fig1|fig3|fig4|fig5|all)
    for arg in "$@"; do
      if [ "$arg" = --fresh ]; then
        parse_fresh "$@"
        set -- ${ARGS[@]+"${ARGS[@]}"} --results-dir "$FRESH"
        echo "--fresh: re-running into $FRESH (rerun the same command to resume), then comparing with $AGAINST" >&2
        break
      fi
    done ;;
esac
case "$target" in
  table1|table2|table3|modern|table1_replica|fig1|fig4)
    ensure_env; ensure_data
    "$PY" -m paper_repro sweep "$target" "$@"
    verify_fresh "$target" ;;
  fig3|fig5)  # drawn from Table 1's natural, PGD AT and AFT runs
    ensure_env; ensure_data
    "$PY" -m paper_repro sweep table1 "$@"
    "$PY" -m paper_repro aggregate $(aggregate_flags "$@")
    verify_fresh table1 ;;
  all)  # one sweep, so the local pool keeps every slot busy across the experiments
    ensure_env; ensure_data
    "$PY" -m paper_repro sweep table1 table2 table3 modern table1_replica fig1 fig4 "$@"
    "$PY" -m paper_repro aggregate $(aggregate_flags "$@")
    verify_fresh table1 table2 table3 modern table1_replica fig1 fig4 ;;
  aggregate)
    ensure_env
    exec "$PY" -m paper_repro aggregate "$@" ;;
  status)
    ensure_env
    if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then set -- table1 "$@"; fi
    exec "$PY" -m paper_repro status "$@" ;;
  test)
    ensure_env; ensure_data
    exec "$PY" -m pytest -q "$@" ;;
  gpucheck)  # no ensure_env: a lent GPU machine has torch but no network to install the rest
    if [ -x "$PY" ]; then exec "$PY" -m paper_repro gpucheck "$@"; fi
    exec python3 -m paper_repro gpucheck "$@" ;;
  ""|-h|--help|help)
    usage ;;
  *)
    echo "reproduce.sh: unknown target '$target' (targets: table1 table2 table3 modern table1_replica fig1 fig3 fig4 fig5 all aggregate status test gpucheck)" >&2
    exit 2 ;;
esac
