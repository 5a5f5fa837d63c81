#!/bin/sh
# A Debian bookworm base image with Python 3.11, made from Debian's own packages, for hosts that reach
# Debian's mirror but no image registry.  The Dockerfile builds on it with
#   --build-arg PYTHON_IMAGE=localhost/d2lora-base:bookworm
# It holds what the Dockerfile expects of its base (python, venv, CA certificates) and libnuma1, so a
# build from a wheel folder needs no network at all.
#
#   docker/base-image.sh [TAG]           needs root, debootstrap, and podman (CONTAINER_ENGINE=docker works too)
set -eu

tag=${1:-localhost/d2lora-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
engine=${CONTAINER_ENGINE:-podman}
packages=python3,python3-venv,python-is-python3,ca-certificates,libnuma1

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT INT TERM
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag"
echo "$tag"
