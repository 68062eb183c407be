#!/usr/bin/env bash
# A real round trip through cryptfs, with nothing to configure: starts its own S3 server
# (moto, on 127.0.0.1 and a free port) or, when moto is not available, uses the local
# directory backend; creates a volume with a demo passphrase, mounts it, copies a small
# directory in with cp, reads it back through the mount and with the mount-free CLI,
# unmounts (which uploads what is pending), remounts and compares, runs fsck, and cleans
# up after itself (it stops only the server and the mount it started).
# CRYPTFS_DEMO_BACKEND=local skips the S3 server and uses the local backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/cryptfs-demo.XXXXXX")
server_pid=""
mnt="$work/mnt"
cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        python3 -m cryptfs umount "$mnt" --timeout 60 || fusermount3 -uz "$mnt" || true
    fi
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cryptfs() { python3 -m cryptfs "$@"; }

# Demo settings only: a real passphrase comes from a prompt or --passphrase-file.
export CRYPTFS_PASSPHRASE="demo passphrase, never for real data"
export CRYPTFS_STATE_DIR="$work/state"      # this machine's record of known volumes
export CRYPTFS_CONFIG="$work/none.yaml"     # ignore any personal config file

if [ "${CRYPTFS_DEMO_BACKEND:-s3}" != local ] && python3 -c "import moto.server, boto3" 2>/dev/null; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    endpoint="http://127.0.0.1:$port"
    export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
    export AWS_EC2_METADATA_DISABLED=true
    unset AWS_PROFILE AWS_CA_BUNDLE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3
    step "Starting an S3 server (moto) on $endpoint"
    python3 -m moto.server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
    server_pid=$!
    python3 - "$endpoint" <<'EOF'
import sys, time, urllib.request, urllib.error
import boto3
for _ in range(300):
    try:
        urllib.request.urlopen(sys.argv[1] + "/", timeout=1).close()
        break
    except urllib.error.HTTPError:
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("demo: the S3 server did not start")
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="cryptfs-demo")
EOF
    url="s3://cryptfs-demo/vault"
    extra=(--endpoint-url "$endpoint")
else
    step "Using the local directory backend (no S3 server)"
    url="file://$work/storage/vault"
    extra=()
fi
args=(${extra[@]+"${extra[@]}"})

step "Some files to protect"
data="$work/holiday"
mkdir -p "$data/photos/2024" "$data/notes"
printf 'Meet at the harbour at nine.\n' >"$data/notes/plan.txt"
: >"$data/notes/empty.txt"
head -c 1500000 /dev/urandom >"$data/photos/2024/beach.raw"
head -c 70000 /dev/urandom >"$data/photos/thumb.jpg"
chmod 600 "$data/notes/plan.txt"
ln -s notes/plan.txt "$data/latest"
find "$data" | sed "s|$work/||" | sort

step "cryptfs init $url"
cryptfs init "$url" "${args[@]}"

mkdir -p "$mnt"
step "cryptfs mount $url $mnt"
cryptfs mount "$url" "$mnt" --cache-dir "$work/cache" "${args[@]}"
mount | grep " $mnt " || true

step "cp -a into the mount; ordinary programs see ordinary files"
cp -a "$data" "$mnt/"
ls -lR "$mnt"
cat "$mnt/holiday/notes/plan.txt"
sha256sum "$data/photos/2024/beach.raw" "$mnt/holiday/photos/2024/beach.raw"

step "cryptfs umount (waits until everything is uploaded)"
cryptfs umount "$mnt"

step "What the storage sees: encrypted names, no tree, no attributes"
if [ -n "$server_pid" ]; then
    python3 - "$endpoint" <<'EOF'
import sys
import boto3
objs = boto3.client("s3", endpoint_url=sys.argv[1]).list_objects_v2(Bucket="cryptfs-demo")["Contents"]
for o in objs[:8]:
    print(f'{o["Size"]:>9}  {o["Key"][:100]}')
print(f"({len(objs)} objects)")
EOF
else
    (cd "$work/storage/vault" && find . -type f -printf '%9s  %P\n' | sort -k2 | cut -c1-111 | head -8)
fi

step "The mount-free CLI reads the same volume: cryptfs ls -l -R, cryptfs cat"
cryptfs ls -l -R "$url" "${args[@]}"
cryptfs cat "$url/holiday/notes/plan.txt" "${args[@]}"

listing() { (cd "$1" && find . -printf '%M %T@ %s %p\n' | sort); }
step "Remount and compare with the original (contents, modes, times, the symlink)"
cryptfs mount "$url" "$mnt" --cache-dir "$work/cache2" "${args[@]}"
diff -r --no-dereference "$data" "$mnt/holiday"
if [ "$(listing "$data")" != "$(listing "$mnt/holiday")" ]; then
    echo "demo: modes, times or sizes differ through the mount" >&2
    exit 1
fi
echo "identical through the mount"
cryptfs umount "$mnt"

step "cryptfs get (download and decrypt without a mount) and compare"
cryptfs get "$url/holiday" "$work/restored" "${args[@]}"
diff -r --no-dereference "$data" "$work/restored"
if [ "$(listing "$data")" != "$(listing "$work/restored")" ]; then
    echo "demo: modes, times or sizes differ" >&2
    exit 1
fi
echo "identical: contents, modes, modification times and the symlink"

step "cryptfs fsck (authenticates every entry, attribute and block)"
cryptfs fsck "$url" "${args[@]}"

step "Demo complete; cleaning up"
