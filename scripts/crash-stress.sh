#!/usr/bin/env bash
# Kills the mount at random points of ordinary workloads (rsync of 1,500 small files, a
# 150 MiB cp, directory renames, an editor save loop, a mkdir/rmdir storm, a multipart
# upload), remounts, and checks every closed file and that fsck exits 0.
#   bash scripts/crash-stress.sh                      # local backend, 20 kills per workload
#   bash scripts/crash-stress.sh --backend s3 --kills 5 --workloads editor,mkdir
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 scripts/crash_stress.py "$@"
