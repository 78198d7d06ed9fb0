# syntax=docker/dockerfile:1.7
#
# Ferry's images, from one multi-stage build (built and run with Podman 4.3
# and locally made base images, see docs/install.md "Images"); with BuildKit:
#
#   docker build -t ghcr.io/ferry-dev/ferry:0.1.0 .                        # runtime (default)
#   docker build --target agent -t ghcr.io/ferry-dev/ferry:0.1.0-agent .   # agent, node's QEMU
#   docker build --target agent-qemu -t ghcr.io/ferry-dev/ferry:0.1.0-qemu .  # agent with QEMU
#
# runtime     distroless, non-root (65532): ferry, ferry-controller,
#             kubectl-ferry, ferry-agent (for the chart's certificate init
#             container). The controller runs from it.
# agent       Debian slim, root (the agent opens /dev/kvm, creates tap
#             devices and, in the chart's `agent.qemu.mode: host`, enters the
#             node's namespaces with nsenter to run the node's QEMU through
#             the `ferry-qemu-host` wrapper, in its own systemd scope so VMs
#             outlive the agent container).
# agent-qemu  agent + Debian's QEMU (qemu-system-x86): the chart's default
#             `agent.qemu.mode: image`; VMs then live in the agent container.
#
# All stages use Debian 13 (trixie) so the glibc the binaries link against
# is the one they run with; trixie ships QEMU 10.0, the version Ferry is
# tested with.

ARG RUST_VERSION=1.90
ARG DEBIAN_SUITE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS build
# build.rs compiles the memtest guest kernel with gcc -m32 and ld -m elf_i386
# (binutils and gcc are in the rust image; no multilib is needed).
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY guest ./guest
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin ferry --bin ferry-agent --bin ferry-controller --bin kubectl-ferry \
 && mkdir -p /out \
 && cp target/release/ferry target/release/ferry-agent \
       target/release/ferry-controller target/release/kubectl-ferry /out/ \
 && strip /out/*

FROM debian:${DEBIAN_SUITE}-slim AS agent
# util-linux: nsenter for host-QEMU mode; iproute2: tap devices and bridges.
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Runs the node's QEMU in the node's mount, UTS, IPC and network namespaces
# (the pod has hostPID, so PIDs already agree) inside a transient systemd
# scope, so the VM is not in the agent container's cgroup. The state
# directory is a hostPath at the same path, so sockets and pid files match.
RUN printf '%s\n' \
      '#!/bin/sh' \
      'set -eu' \
      'exec nsenter --target 1 --mount --uts --ipc --net -- \' \
      '  systemd-run --scope --quiet --collect --unit "ferry-qemu-$$" -- \' \
      '  "${FERRY_HOST_QEMU:-qemu-system-x86_64}" "$@"' \
      > /usr/local/bin/ferry-qemu-host \
 && chmod 0755 /usr/local/bin/ferry-qemu-host
# The agent needs root: /dev/kvm, tap devices, nsenter. The chart runs it
# privileged by default (agent.privileged).
USER 0:0
ENTRYPOINT ["/usr/local/bin/ferry-agent"]
CMD ["run", "--help"]

FROM agent AS agent-qemu
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils \
 && rm -rf /var/lib/apt/lists/*

# Last, so that a plain `docker build .` produces the small image.
FROM gcr.io/distroless/cc-debian13:nonroot AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["--help"]
