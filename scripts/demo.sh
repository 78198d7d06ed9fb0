#!/usr/bin/env bash
# Ferry in one command: installs what is missing (QEMU, kubectl), builds,
# starts `ferry up --demo` (API server, controller, agents, small test-guest
# VMs) in the background, shows the hosts and VMs, and live-migrates a demo
# VM with `kubectl ferry migrate`, following its progress.
#
#   scripts/demo.sh [--once] [--release] [--hosts N] [--data-dir DIR] [--listen ADDR]
#
#   --once      stop `ferry up` at the end (for CI); otherwise it keeps running
#   --release   build with optimisations (slower build, faster relay)
set -euo pipefail
cd "$(dirname "$0")/.."

ONCE=0
PROFILE=debug
HOSTS=2
DATA_DIR=.ferry
LISTEN=127.0.0.1:6443
while [ $# -gt 0 ]; do
  case "$1" in
    --once) ONCE=1 ;;
    --release) PROFILE=release ;;
    --hosts) HOSTS=$2; shift ;;
    --data-dir) DATA_DIR=$2; shift ;;
    --listen) LISTEN=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[ "$HOSTS" -ge 2 ] || { echo "demo.sh: the demo migrates between hosts: --hosts must be at least 2" >&2; exit 2; }

. scripts/setup.sh
ferry_setup

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

say "building Ferry ($PROFILE)"
if [ "$PROFILE" = release ]; then
  cargo build --release --bin ferry --bin kubectl-ferry
else
  cargo build --bin ferry --bin kubectl-ferry
fi
BIN="$CARGO_TARGET_DIR/$PROFILE"
# kubectl finds the `kubectl ferry` plugin on PATH; `kubectl` is the real one.
export PATH="$BIN:$(dirname "$FERRY_KUBECTL"):$PATH"
kubectl() { "$FERRY_KUBECTL" "$@"; }

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
OUT="$DATA_DIR/up.out"
LOG="$DATA_DIR/up.log"
: > "$OUT"

say "starting ferry up --demo --hosts $HOSTS (log: $LOG)"
nohup "$BIN/ferry" up --demo --hosts "$HOSTS" --data-dir "$DATA_DIR" --listen "$LISTEN" \
  >"$OUT" 2>>"$LOG" </dev/null &
UP_PID=$!
stop_up() {
  kill -TERM "$UP_PID" 2>/dev/null || return 0
  wait "$UP_PID" 2>/dev/null || true
}
if [ "$ONCE" = 1 ]; then trap stop_up EXIT; fi

for _ in $(seq 1 240); do
  grep -qx 'ferry up: ready' "$OUT" && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "ferry up exited before it was ready:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
grep -qx 'ferry up: ready' "$OUT" || { echo "ferry up not ready after 120s; see $LOG" >&2; exit 1; }
grep -vx 'ferry up: ready' "$OUT"

export KUBECONFIG="$DATA_DIR/kubeconfig"
say "the cluster"
run kubectl wait fvm --all --for=jsonpath='{.status.phase}'=Running --timeout=120s
run kubectl get hosts,fvm

SOURCE=$(kubectl get fvm demo-1 -o jsonpath='{.status.host}')
TARGET=$(kubectl get hosts -o jsonpath='{.items[*].metadata.name}' | tr ' ' '\n' | grep -vx "$SOURCE" | head -n 1)
say "live-migrating demo-1 from $SOURCE to $TARGET while its guest keeps rewriting memory"
run kubectl ferry migrate demo-1 --to "$TARGET"
run kubectl get fvm,mig

# The guest checks every page of its memory against the pattern it wrote.
verify_guest() {
  local host sock
  host=$(kubectl get fvm "$1" -o jsonpath='{.status.host}')
  sock="$DATA_DIR/hosts/$host/state/vms/default.$1/serial.sock"
  printf '%s on %s: ' "$1" "$host"
  python3 - "$sock" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(60)
s.sendall(b"verify\n")
for line in s.makefile():
    if line.startswith("VERIFY"):
        print(line.strip())
        sys.exit(0 if line.startswith("VERIFY OK") else 1)
EOF
}
say "asking the guest to verify its memory on $TARGET"
verify_guest demo-1

if [ "$ONCE" = 1 ]; then
  say "stopping ferry up (--once)"
  stop_up
  trap - EXIT
  echo "stopped."
else
  say "ferry up keeps running (pid $UP_PID)"
  cat <<EOF
Try:
  export PATH="$BIN:\$PATH" KUBECONFIG="$KUBECONFIG"
  $FERRY_KUBECTL get hosts,fvm,mig
  $FERRY_KUBECTL ferry status
  $FERRY_KUBECTL ferry migrate demo-2 --to $SOURCE
Walkthrough of every scenario: docs/walkthrough.md
Stop it (VMs, agents and network are removed; the data stays for next time):
  kill $UP_PID
EOF
fi
