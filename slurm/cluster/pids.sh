# Sourced by start.sh and stop.sh: where each daemon's pid is recorded, and whether it lives.
# Expects DIR (the cluster's folder) to be set.

pidfile() {
  case "$1" in
    munged) echo "$DIR/munge/munged.pid" ;;
    mariadbd) echo "$DIR/mysql/mariadbd.pid" ;;
    *) echo "$DIR/run/$1.pid" ;;
  esac
}

# The recorded pid, only if it is alive AND still that program: a stale pid file (reboot, pid
# reuse) is never mistaken for a live daemon, and a reused pid is never signalled.
live_pid() {
  local file pid
  file="$(pidfile "$1")"
  [ -s "$file" ] || return 1
  pid="$(tr -dc '0-9' < "$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
  echo "$pid"
}
