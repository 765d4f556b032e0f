#!/bin/sh
# mmdebstrap essential hook for the lab-host image: $1 is the new root. The lab boots
# vmlab's own small initrd (vmlab/initramfs.py), never the image's, so the kernel's
# update-initramfs runs (about 15 s of a cold build: one at the kernel's install, one
# from initramfs-tools' trigger) build nothing anyone boots. Diverted to a no-op here,
# before the kernel is installed; customize.sh puts the real one back.
set -eu
root="$1"
chroot "$root" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.vmlab \
  --add /usr/sbin/update-initramfs
mkdir -p "$root/usr/sbin"
printf '#!/bin/sh\n# vmlab: no initramfs while the lab image is built (see essential-hook.sh)\nexit 0\n' \
  > "$root/usr/sbin/update-initramfs"
chmod 0755 "$root/usr/sbin/update-initramfs"
