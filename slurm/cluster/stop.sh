#!/usr/bin/env bash
# Stop the throwaway cluster that start.sh started: exactly the daemons whose pid files it
# recorded under $REPRO_SLURM_DIR (default /tmp/repro-slurm), newest first, and nothing else.
#   slurm/cluster/stop.sh           stop; keep state, logs and the accounting database
#   slurm/cluster/stop.sh --purge   stop, then delete the whole directory
set -euo pipefail

DIR="${REPRO_SLURM_DIR:-/tmp/repro-slurm}"
say() { echo "stop.sh: $*" >&2; }

. "$(dirname "$0")/pids.sh"  # pidfile, live_pid

status=0
for d in slurmd slurmctld slurmdbd mariadbd munged; do
  if pid="$(live_pid "$d")"; then
    say "stopping $d (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do
      [ -d "/proc/$pid" ] || break
      sleep 0.5
    done
    if [ -d "/proc/$pid" ]; then
      say "$d (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || status=1
    fi
  fi
  rm -f "$(pidfile "$d")"
done

if [ "${1:-}" = "--purge" ]; then
  case "$DIR" in
    /|"") say "refusing to delete '$DIR'"; exit 1 ;;
  esac
  rm -rf "$DIR"
  say "removed $DIR"
fi
exit "$status"
