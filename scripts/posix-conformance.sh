#!/usr/bin/env bash
# Runs the pjdfstest POSIX conformance suite as root on an `-o allow_other` cryptfs mount.
#   bash scripts/posix-conformance.sh PJDFSTEST_DIR [local|s3]
# PJDFSTEST_DIR is a checkout of pjdfstest (built here if its binary is missing; needs
# autoconf, automake and a C compiler). "s3" (the default) starts a moto server on
# 127.0.0.1; "local" uses the local directory backend. Prints prove's summary, then checks
# that the unmount exits 0, that fsck is clean and that the mount log holds no error.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=$(realpath "${1:?usage: posix-conformance.sh PJDFSTEST_DIR [local|s3]}")
kind=${2:-s3}
[ "$(id -u)" = 0 ] || { echo "posix-conformance: run as root (the suite changes owners)" >&2; exit 2; }
if [ ! -x "$suite/pjdfstest" ]; then
    (cd "$suite" && autoreconf -ifs && ./configure && make pjdfstest) >/dev/null
fi

work=$(mktemp -d /tmp/cryptfs-posix.XXXXXX)
chmod 755 "$work"
mnt="$work/mnt"
server_pid=""
cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -uz "$mnt" || true; fi
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cryptfs() { python3 -m cryptfs "$@"; }
export CRYPTFS_PASSPHRASE="conformance run" CRYPTFS_CONFIG="$work/none.yaml" CRYPTFS_STATE_DIR="$work/state"

args=()
if [ "$kind" = s3 ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
    unset AWS_PROFILE AWS_CA_BUNDLE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3
    python3 -m moto.server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
    server_pid=$!
    args=(--endpoint-url "http://127.0.0.1:$port")
    python3 - "${args[1]}" <<'EOF'
import sys, time
import boto3
for _ in range(300):
    try:
        boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="posix")
        break
    except Exception:
        time.sleep(0.1)
else:
    sys.exit("posix-conformance: the S3 server did not start")
EOF
    url=s3://posix/vol
else
    url="file://$work/vol"
fi

cryptfs init "$url" "${args[@]}" -q --rsa-bits 2048 >/dev/null
mkdir "$mnt"
cryptfs mount "$url" "$mnt" "${args[@]}" -o allow_other --cache-dir "$work/cache"
chmod 755 "$mnt"
status=0
(cd "$mnt" && prove -r "$suite/tests") >"$work/prove.log" 2>&1 || status=$?
sed -n '/^Test Summary Report/,$p' "$work/prove.log"
grep -v ' ok$' "$work/prove.log" | grep -v '^Test Summary\|^---' | grep '\.t ' || true
cryptfs umount "$mnt" || { echo "posix-conformance: umount failed" >&2; exit 1; }
cryptfs fsck "$url" "${args[@]}" | tail -1
if grep -h "Traceback\|ERROR" "$work"/cache/*/mount.log; then
    echo "posix-conformance: errors in the mount log" >&2
    exit 1
fi
exit "$status"
