#!/bin/sh
# mmdebstrap customize hook for the lab-host image: $1 is the new root, VMLAB_SRC the
# vmlab source tree. Builds the exporter against this image's own kernel headers.
set -eu
root="$1"
src="$VMLAB_SRC"
build="/usr/src/linux-headers-KVER"
if [ -n "${VMLAB_TREE:-}" ]; then
  # tree:DIR: the exporter is built against the tree itself, bound read-only into the
  # image (nothing of the user's is written); vmlab installs the tree's modules after this
  kver=$(cat "$VMLAB_TREE/include/config/kernel.release")
  mkdir -p "$root/lib/modules/$kver"
  build=/usr/src/vmlab-tree
  mkdir -p "$root$build"
  mount --bind "$VMLAB_TREE" "$root$build"
  mount -o remount,bind,ro "$root$build"
  trap 'umount "$root$build" 2>/dev/null || true' EXIT
else
  kver=$(ls "$root/lib/modules" | head -n 1)
fi
build=$(echo "$build" | sed "s/KVER/$kver/")
echo "vmlab: building vmlab-exporter for $kver against $build"
rm -rf "$root/usr/src/vmlab-exporter"
mkdir -p "$root/usr/src/vmlab-exporter"
cp -r "$src/host-tools/vmlab-exporter/." "$root/usr/src/vmlab-exporter/"
chroot "$root" make -s -C "$build" M=/usr/src/vmlab-exporter modules || {
  echo "vmlab: exporter build failed"; exit 1; }
if [ -n "${VMLAB_TREE:-}" ]; then umount "$root$build"; rmdir "$root$build"; trap - EXIT; fi
mkdir -p "$root/lib/modules/$kver/updates"
cp "$root/usr/src/vmlab-exporter/vmlab_exporter.ko" "$root/lib/modules/$kver/updates/"
chroot "$root" depmod -a "$kver"
if [ -f "$root/usr/src/vmlab-exporter/tools/uapi_dump.c" ]; then
  chroot "$root" gcc -O2 -Wall -I/usr/src/vmlab-exporter/include/uapi \
    -o /usr/local/bin/vmlab-uapi-dump /usr/src/vmlab-exporter/tools/uapi_dump.c
fi
mkdir -p "$root/usr/lib/vmlab"
cp "$src/host-tools/vmm-align/vmlab_align_reserve.c" "$root/tmp/vmlab_align_reserve.c"
chroot "$root" gcc -O2 -Wall -Werror -shared -fPIC -o /usr/lib/vmlab/align-reserve.so \
  /tmp/vmlab_align_reserve.c -ldl
rm -f "$root/tmp/vmlab_align_reserve.c"
if [ -n "${VMLAB_QEMU_BUILD:-}" ]; then
  # build:DIR: the user's QEMU and its firmware, first on PATH through a wrapper that
  # points it at that firmware (a build tree's QEMU looks for it where it was configured)
  mkdir -p "$root/opt/vmlab-qemu"
  cp "$VMLAB_QEMU_BUILD/qemu-system-x86_64" "$root/opt/vmlab-qemu/"
  cp -r "$VMLAB_QEMU_BUILD/pc-bios" "$root/opt/vmlab-qemu/pc-bios"
  # a build with --enable-modules: QEMU looks for its modules beside its executable
  for m in "$VMLAB_QEMU_BUILD"/*.so; do [ -f "$m" ] && cp "$m" "$root/opt/vmlab-qemu/"; done
  printf '#!/bin/sh\nexec /opt/vmlab-qemu/qemu-system-x86_64 -L /opt/vmlab-qemu/pc-bios "$@"\n' \
    > "$root/usr/local/bin/qemu-system-x86_64"
  chmod 0755 "$root/usr/local/bin/qemu-system-x86_64"
fi
if [ -n "${VMLAB_QEMU_QMP:-}" ]; then
  # vmlab's one dependency that Debian does not package (pure Python), for vmlab in the lab
  mkdir -p "$root/usr/lib/python3/dist-packages/qemu"
  cp -r "$VMLAB_QEMU_QMP" "$root/usr/lib/python3/dist-packages/qemu/qmp"
  rm -rf "$root/usr/lib/python3/dist-packages/qemu/qmp/__pycache__"
fi
install -m 0755 "$src/guest-images/lab/lab-setup" "$root/usr/lib/vmlab/lab-setup"
install -m 0644 "$src/guest-images/lab/inittab" "$root/etc/inittab"
# The image is booted with init=busybox; no getty, no passwords: keys only.
sed -i 's/^root:[^:]*:/root:*:/' "$root/etc/shadow"
echo "vmlab-lab" > "$root/etc/hostname"
# the real update-initramfs back (essential-hook.sh diverted it for the build)
rm -f "$root/usr/sbin/update-initramfs"
chroot "$root" dpkg-divert --local --rename --remove /usr/sbin/update-initramfs
chroot "$root" dpkg-query -W -f '${Package}\t${Version}\n' > "$root/usr/lib/vmlab/packages.tsv"
