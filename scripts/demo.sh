#!/usr/bin/env bash
# Ferry in one command: installs what is missing (QEMU, kubectl), builds,
# starts `ferry up --demo` (API server, controller, agents, small test-guest
# VMs) in the background, shows the hosts and VMs, and live-migrates demo
# VMs with `kubectl ferry migrate`, following its progress: as root, the
# networked Linux guest demo-1 while a client pings it every 20 ms from the
# client namespace (the ping gap is printed), and a memtest guest whose
# memory is then verified on its new host.
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

other_host() {
  kubectl get hosts -o jsonpath='{.items[*].metadata.name}' | tr ' ' '\n' | grep -vx "$1" | head -n 1
}

# demo-1 has an address on the VM network when ferry up runs as root and
# the Linux test guest could be built (ferry up said which on its stderr).
NET_IP=$(kubectl get fvm demo-1 -o jsonpath='{.status.networks[0].ip}')
CLIENT_NS=$(kubectl get configmap -n ferry-system ferry-up-network -o jsonpath='{.data.clientNamespace}' 2>/dev/null || true)
MEM_VM=demo-1
if [ -n "$NET_IP" ] && [ -n "$CLIENT_NS" ]; then
  MEM_VM=demo-2
  IP=${NET_IP%/*}
  PING=$(kubectl get configmap -n ferry-system ferry-up-network -o jsonpath='{.data.ping}')
  SOURCE=$(kubectl get fvm demo-1 -o jsonpath='{.status.host}')
  TARGET=$(other_host "$SOURCE")
  say "demo-1 (Linux test guest) answers at $IP from the client namespace $CLIENT_NS"
  # $PING may be "<busybox> ping": split on purpose. The guest answers
  # once it has booted (a few seconds after its QEMU runs).
  # shellcheck disable=SC2086
  for _ in $(seq 1 120); do
    ip netns exec "$CLIENT_NS" $PING -c 1 -W 1 "$IP" >/dev/null 2>&1 && break
  done
  # shellcheck disable=SC2086
  run ip netns exec "$CLIENT_NS" $PING -c 3 "$IP"
  say "live-migrating demo-1 from $SOURCE to $TARGET while the client pings it every 20 ms"
  PINGS="$DATA_DIR/ping.out"
  # shellcheck disable=SC2086
  ip netns exec "$CLIENT_NS" $PING -i 0.02 "$IP" >"$PINGS" 2>&1 &
  PING_PID=$!
  sleep 1
  run kubectl ferry migrate demo-1 --to "$TARGET"
  sleep 1
  kill -INT "$PING_PID" 2>/dev/null || true
  wait "$PING_PID" 2>/dev/null || true
  grep -E 'transmitted|received' "$PINGS" || true
  awk -F'seq=' '/seq=/ { split($2, a, " "); s = a[1]; if (p != "" && s - p > m) m = s - p; p = s }
    END { printf "longest gap between ping replies: %d ms (pings every 20 ms)\n", m * 20 }' "$PINGS"
fi

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
if kubectl get fvm "$MEM_VM" >/dev/null 2>&1; then
  SOURCE=$(kubectl get fvm "$MEM_VM" -o jsonpath='{.status.host}')
  TARGET=$(other_host "$SOURCE")
  say "live-migrating $MEM_VM from $SOURCE to $TARGET while its guest keeps rewriting memory"
  run kubectl ferry migrate "$MEM_VM" --to "$TARGET"
  run kubectl get fvm,mig
  say "asking the guest to verify its memory on $TARGET"
  verify_guest "$MEM_VM"
else
  echo "no memtest demo VM ($MEM_VM) to migrate"
fi

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
  $FERRY_KUBECTL ferry status          # hosts, migrations, VM addresses and how to reach them
  $FERRY_KUBECTL ferry migrate $MEM_VM --to $SOURCE
Walkthrough of every scenario: docs/walkthrough.md
Stop it (VMs, agents and network are removed; the data stays for next time):
  kill $UP_PID
EOF
fi
