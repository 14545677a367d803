#!/usr/bin/env bash
# A Debian bookworm base image with Debian's own Python 3.11 (python3, python3-venv), for a
# machine that reaches Debian's package mirror but no image registry: debootstrap into a folder,
# then `docker import`. Usage: scripts/docker_base.sh [TAG] [ROOTFS_TARBALL_CACHE]
#   docker build --build-arg PYTHON_IMAGE=magnus-base:bookworm -t magnus-serve:cpu .
# Needs root and debootstrap (apt-get install debootstrap).
set -euo pipefail
tag=${1:-magnus-base:bookworm}
cache=${2:-${XDG_CACHE_HOME:-$HOME/.cache}/magnus/debian-bookworm-python.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ ! -s "$cache" ]; then
  root=$(mktemp -d)
  chmod 0755 "$root"  # the image's /: mktemp makes it 0700, which locks out every user but root
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  mkdir -p "$(dirname "$cache")"
  tar -C "$root" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
fi
docker import --change 'CMD ["python3"]' "$cache" "$tag"
