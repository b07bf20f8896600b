#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, built without any image registry:
# debootstrap from a Debian mirror, then `docker import`. For machines that reach a Debian
# mirror but no registry; pass the result to the Dockerfiles as --build-arg BASE_IMAGE=<tag>.
#
#   docker/debootstrap-base.sh [TAG] [MIRROR]      (root, needs debootstrap and docker)
set -euo pipefail
tag="${1:-llmup-base:bookworm}"
mirror="${2:-http://deb.debian.org/debian}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag already exists"
  exit 0
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$tag"
echo "built $tag"
