#!/usr/bin/env bash
# Runs the whole test suite (installing what it needs first). Extra arguments go to pytest.
# Without arguments, the S3 mount and CLI tests that matter most for real-world use (ordinary
# programs, kills, two mounts, tampering, recovery) run a second time against SeaweedFS, a
# real distributed object store, since moto does not model every behaviour of one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -gt 0 ]; then
    exec python3 -m pytest -q "$@"
fi
python3 -m pytest -q
echo "test: again on SeaweedFS (CRYPTFS_TEST_S3=seaweedfs)"
CRYPTFS_TEST_S3=seaweedfs exec python3 -m pytest -q tests/test_mount.py tests/test_cli.py \
    -k "s3 and (cp_a or rsync or git or sqlite or editor or kill_9 or two_mounts or put_variants or tampered or decrypt or fsck)"
