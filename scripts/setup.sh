#!/usr/bin/env bash
# Installs what cryptfs needs on a fresh Debian machine: FUSE (libfuse 3 and 2), the
# programs the tests drive, and the Python package with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
for pkg in fuse3 libfuse3-3 libfuse2 rsync sqlite3 git attr; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

# mount(8) and umount(8) look for their helpers in /sbin only: link the installed ones there
for helper in mount.cryptfs umount.fuse.cryptfs; do
    found="$(command -v "$helper" || true)"
    if [ -n "$found" ] && [ ! -e "/sbin/$helper" ]; then
        $SUDO ln -s "$found" "/sbin/$helper"
    fi
done
