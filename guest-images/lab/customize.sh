#!/bin/sh
# mmdebstrap customize hook for the lab-host image: $1 is the new root, VMLAB_SRC the
# vmlab source tree. Builds the exporter against this image's own kernel headers.
set -eu
root="$1"
src="$VMLAB_SRC"
kver=$(ls "$root/lib/modules" | head -n 1)
echo "vmlab: building vmlab-exporter for $kver"
rm -rf "$root/usr/src/vmlab-exporter"
mkdir -p "$root/usr/src/vmlab-exporter"
cp -r "$src/host-tools/vmlab-exporter/." "$root/usr/src/vmlab-exporter/"
chroot "$root" make -s -C "/usr/src/linux-headers-$kver" M=/usr/src/vmlab-exporter modules
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
install -m 0755 "$src/guest-images/lab/lab-setup" "$root/usr/lib/vmlab/lab-setup"
install -m 0644 "$src/guest-images/lab/inittab" "$root/etc/inittab"
# The image is booted with init=busybox; no getty, no passwords: keys only.
sed -i 's/^root:[^:]*:/root:*:/' "$root/etc/shadow"
echo "vmlab-lab" > "$root/etc/hostname"
chroot "$root" dpkg-query -W -f '${Package}\t${Version}\n' > "$root/usr/lib/vmlab/packages.tsv"
