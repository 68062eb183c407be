#!/usr/bin/env python3
"""Make the golden vectors of one format version: a small volume on the local backend and its manifest.

Run once per version; its output is committed and pinned: every later cryptfs must open and
decrypt it. Version 1: tests/vectors/volume/ and tests/vectors/manifest.json; version N > 1:
tests/vectors/volume-vN/ and tests/vectors/manifest-vN.json. Running it again makes a different
volume (fresh keys, ids and nonces), so it refuses to overwrite existing vectors. A new
format version gets new vectors next to these, never instead of them.

    python3 tests/vectors/make_vectors.py VERSION

The passphrase is fixed and public (it is in the manifest too): these vectors protect nothing.
The volume uses the default 64 KiB block size and 2048-bit RSA keys (to keep it small).
"""

import hashlib
import json
import os
import stat
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from cryptfs import format as fmt  # noqa: E402
from cryptfs import volume  # noqa: E402
from cryptfs.backend.local import META_BLOCK, LocalBackend  # noqa: E402
from cryptfs.store import Store  # noqa: E402

B = fmt.DEFAULT_BLOCK_SIZE
T0 = 1_700_000_000_000_000_000   # 2023-11-14T22:13:20Z in ns; every timestamp is T0 + a small offset

NON_UTF8 = b"non-utf8-\xff\xfe-caf\xe9.bin"
LONG_255 = b"long-name-" + b"x" * 240 + b".data"
assert len(LONG_255) == 255


def content(label: bytes, size: int) -> bytes:
    """Reproducible bytes: SHA-256 in counter mode over the label."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(label + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


# (path components, kind, permission bits, payload: size for files, target for symlinks)
TREE = [
    ((b"empty",), "file", 0o644, 0),
    ((b"one-byte",), "file", 0o600, 1),
    ((b"b-minus-1",), "file", 0o644, B - 1),
    ((b"b",), "file", 0o444, B),
    ((b"b-plus-1",), "file", 0o755, B + 1),
    ((b"two-b",), "file", 0o640, 2 * B),
    ((NON_UTF8,), "file", 0o644, 100),
    ((LONG_255,), "file", 0o644, 255),
    ((b"dir",), "dir", 0o750, None),
    ((b"dir", b"nested dir"), "dir", 0o700, None),
    ((b"dir", b"nested dir", b"deep.txt"), "file", 0o600, 40),
    ((b"dir", b"nested dir", NON_UTF8), "file", 0o644, 7),
    ((b"dir", b"link-to-one"), "symlink", 0o777, b"../one-byte"),
    ((b"link-to-deep",), "symlink", 0o777, b"dir/nested dir/deep.txt"),
]
TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}


def paths(version: int) -> tuple[str, str]:
    """(volume directory, manifest) of one version's vectors."""
    if version == 1:
        return os.path.join(HERE, "volume"), os.path.join(HERE, "manifest.json")
    return os.path.join(HERE, f"volume-v{version}"), os.path.join(HERE, f"manifest-v{version}.json")


def main(version: int) -> int:
    passphrase = f"cryptfs golden vectors, format version {version}".encode()
    volume_dir, manifest_path = paths(version)
    if os.path.exists(volume_dir) or os.path.exists(manifest_path):
        print(f"refusing to overwrite the committed vectors in {HERE}", file=sys.stderr)
        return 1
    os.makedirs(volume_dir)
    os.environ["CRYPTFS_STATE_DIR"] = tempfile.mkdtemp(prefix="cryptfs-vectors-state-")
    vol = volume.create(LocalBackend(volume_dir), "", passphrase, block_size=B, rsa_bits=2048, version=version)
    store = Store(vol)
    root_attrs = fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, T0, T0)
    store.init_root(root_attrs)

    dir_ids = {(): fmt.ROOT_DIR_ID}
    entries = [{"path": "/", "path_hex": [], "type": "dir", "mode": root_attrs.mode,
                "mode_octal": oct(root_attrs.mode), "uid": 0, "gid": 0, "mtime_ns": T0, "ctime_ns": T0,
                "dir_id": fmt.ROOT_DIR_ID.hex(), "key": store.backptr_key(fmt.ROOT_DIR_ID)}]
    for n, (parts, kind, perm, payload) in enumerate(TREE, start=1):
        parent = dir_ids[parts[:-1]]
        attrs = fmt.Attrs(TYPE_BITS[kind] | perm, 1000 + n % 2, 100, T0 + n * 1_000_000_123, T0 + n * 2_000_000_000)
        record = {"path": "/" + b"/".join(parts).decode("utf-8", "backslashreplace"),
                  "path_hex": [p.hex() for p in parts], "type": kind, "mode": attrs.mode,
                  "mode_octal": oct(attrs.mode), "uid": attrs.uid, "gid": attrs.gid,
                  "mtime_ns": attrs.mtime_ns, "ctime_ns": attrs.ctime_ns}
        if kind == "dir":
            entry = store.mkdir(parent, parts[-1], attrs)
            dir_ids[parts] = entry.obj_id
            record["dir_id"] = entry.obj_id.hex()
        else:
            data = payload if kind == "symlink" else content(b"/".join(parts), payload)
            entry = store.write_bytes(parent, parts[-1], data, attrs, create_only=True)
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                          object_size=store.layout.object_size(len(data)), file_id=entry.obj_id.hex())
            if kind == "symlink":
                record["target_hex"] = data.hex()
        record["key"] = entry.key
        entries.append(record)

    objects = {}
    for dirpath, _, names in os.walk(volume_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            key = os.path.relpath(path, volume_dir).replace(os.sep, "/")
            objects[key] = os.path.getsize(path) - META_BLOCK
    manifest = {
        "description": f"cryptfs format version {version} golden vectors; made once by make_vectors.py, "
                       "never regenerated",
        "format_version": version,
        "passphrase": passphrase.decode(),
        "block_size": B,
        "rsa_bits": 2048,
        "volume_id": vol.volume_id,
        "owner_fingerprint": vol.owner_fingerprint(),
        "content_fingerprint": vol.body["content_fingerprint"],
        "entries": entries,
        "objects": dict(sorted(objects.items())),
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(volume_dir) for n in ns)
    print(f"wrote {len(objects)} objects ({total} bytes) to {volume_dir} and {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else fmt.VERSION))
