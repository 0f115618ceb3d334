#!/usr/bin/env bash
# Build a Debian bookworm base image without a container registry: debootstrap a minimal
# root file system from the Debian mirror apt already uses, and import it into Docker.
#   bash scripts/base_image.sh [IMAGE]     (default local/debian:bookworm)
# The chatq Dockerfile takes it with --build-arg BASE_IMAGE=local/debian:bookworm. Python
# 3.11 comes with it (bookworm's python3), so the image build installs no system packages.
set -euo pipefail
IMAGE=${1:-local/debian:bookworm}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists"
  exit 0
fi
MIRROR=${DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ]; then
  # The first bookworm source apt uses (deb822 or one-line format).
  MIRROR=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '$1 == "URIs:" || $1 == "deb" {for (i = 2; i <= NF; i++) print $i}' \
    | grep -E '^https?://.*/debian/?$' | head -1 || true)
fi
[ -n "$MIRROR" ] || { echo "no Debian mirror found; set DEBIAN_MIRROR" >&2; exit 1; }
ROOTFS=$(mktemp -d /tmp/chatq-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >/tmp/chatq-debootstrap.log 2>&1 || {
  tail -20 /tmp/chatq-debootstrap.log >&2
  exit 1
}
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import - "$IMAGE" >/dev/null
echo "built base image $IMAGE from $MIRROR"
