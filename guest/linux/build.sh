#!/bin/sh
# Build Ferry's Linux test guest: the Debian cloud kernel and a small
# busybox initramfs whose /init configures eth0 from the kernel command line
# and serves a TCP echo service on port 7 (and answers ping).
#
#   guest/linux/build.sh OUT_DIR
#
# Writes OUT_DIR/vmlinuz, OUT_DIR/initrd.gz and OUT_DIR/busybox (a static
# busybox for the host side of tests), then OUT_DIR/kernel-package last: its
# presence marks a complete build. Needs apt-get (download only, nothing is
# installed), dpkg-deb and gzip (cpio comes from busybox itself).
set -eu
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# The versioned kernel package the cloud meta-package points at.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: *\(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
if [ -z "$kpkg" ]; then
    echo "build.sh: apt-cache knows no linux-image-cloud-amd64 (run apt-get update?)" >&2
    exit 2
fi
apt-get download "$kpkg" busybox-static >download.log 2>&1 || {
    cat download.log >&2
    echo "build.sh: apt-get download $kpkg busybox-static failed" >&2
    exit 3
}
mkdir kernel busybox
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
vmlinuz=$(ls kernel/boot/vmlinuz-* | head -n1)

root=initramfs
mkdir -p $root/bin $root/proc $root/sys $root/dev $root/tmp $root/etc
cp busybox/bin/busybox $root/bin/busybox
# The cloud kernel has virtio and virtio-net as modules; /init loads them in
# this (dependency) order.
mkdir -p $root/lib/modules
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
    failover net_failover virtio_net; do
    ko=$(find kernel/lib/modules -name "$m.ko*" | head -n1)
    [ -n "$ko" ] || { echo "build.sh: module $m missing from $kpkg" >&2; exit 4; }
    cp "$ko" $root/lib/modules/
    echo "${ko##*/}" >>$root/lib/modules/order
done
for applet in sh ip nc cat mount sleep echo insmod ping; do
    ln -s busybox "$root/bin/$applet"
done
cp "$here/init" $root/init
chmod 755 $root/init
# busybox's own cpio: the host need not have one.
bb=$work/busybox/bin/busybox
(cd $root && find . | "$bb" cpio -o -H newc) >initrd.cpio
[ -s initrd.cpio ] || { echo "build.sh: cpio produced nothing" >&2; exit 4; }
gzip -9 initrd.cpio
mv initrd.cpio.gz initrd.gz

cp "$vmlinuz" "$out/vmlinuz.tmp"
mv initrd.gz "$out/initrd.gz.tmp"
echo "$kpkg" >"$out/kernel-package.tmp"
# The same static busybox serves the host side of tests (ping, nc).
cp busybox/bin/busybox "$out/busybox.tmp"
mv "$out/busybox.tmp" "$out/busybox"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
mv "$out/kernel-package.tmp" "$out/kernel-package"
