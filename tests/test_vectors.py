"""Golden vectors: the committed volume of every format version must open and decrypt, forever.

tests/vectors/volume (version 1) and tests/vectors/volume-v2 were each made once by
tests/vectors/make_vectors.py (never re-run here); their manifests list what they hold. Tests work on a copy, since opening a
volume records state. One test decodes files with nothing but the `cryptography` primitives
and docs/format.md, so the specification and the code cannot drift apart unnoticed.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import stat
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cryptfs import format as fmt
from cryptfs import fsck, volume
from cryptfs.backend.local import LocalBackend
from cryptfs.store import Store

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")


class Vectors:
    """One version's committed volume and manifest."""

    def __init__(self, version: int):
        self.version = version
        suffix = "" if version == 1 else f"-v{version}"
        self.dir = os.path.join(HERE, "volume" + suffix)
        with open(os.path.join(HERE, f"manifest{suffix}.json")) as f:
            self.manifest = json.load(f)
        self.passphrase = self.manifest["passphrase"].encode()
        self.entries = {tuple(bytes.fromhex(p) for p in e["path_hex"]): e for e in self.manifest["entries"]}


SETS = {v: Vectors(v) for v in fmt.VERSIONS}
PATHS = list(SETS[1].entries)  # every version holds the same tree
META_BLOCK = 4096   # the local backend's metadata block in front of every object body


@pytest.fixture(scope="module")
def state_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vector-state"))


@pytest.fixture(autouse=True)
def _state_dir(monkeypatch, state_root):
    monkeypatch.setenv("CRYPTFS_STATE_DIR", state_root)


@pytest.fixture(scope="module", params=fmt.VERSIONS, ids=lambda v: f"v{v}")
def vec(request) -> Vectors:
    return SETS[request.param]


@pytest.fixture(scope="module")
def copy(tmp_path_factory, vec):
    dest = str(tmp_path_factory.mktemp("vectors") / "volume")
    shutil.copytree(vec.dir, dest)
    return dest


@pytest.fixture(scope="module")
def store(copy, state_root, vec):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTFS_STATE_DIR", state_root)
        return Store(volume.open_volume(LocalBackend(copy), "", vec.passphrase))


def walk(store):
    """{path components: Entry} for the whole tree, from listings."""
    root = store.root()
    out = {(): root}
    todo = [((), root)]
    while todo:
        path, directory = todo.pop()
        for entry in store.list_entries(directory.obj_id):
            out[path + (entry.name,)] = entry
            if entry.is_dir:
                todo.append((path + (entry.name,), entry))
    return out


def test_manifest_covers_the_brief(vec):
    sizes = {e["size"] for e in vec.manifest["entries"] if e["type"] == "file"}
    b = vec.manifest["block_size"]
    assert b == 65536 and vec.manifest["format_version"] == vec.version
    assert {0, 1, b - 1, b, b + 1, 2 * b} <= sizes
    names = [p[-1] for p in vec.entries if p]
    assert any(len(n) == 255 for n in names)
    assert any(_not_utf8(n) for n in names)
    assert any(len(p) == 3 for p in vec.entries)
    assert {e["type"] for e in vec.manifest["entries"]} == {"file", "dir", "symlink"}
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(vec.dir) for n in ns)
    assert total < 2 * 1024 * 1024


def _not_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_config(store, vec):
    body = store.vol.body
    assert body["format"] == "cryptfs-volume" and body["version"] == vec.version and body["generation"] == 1
    assert body["block_size"] == vec.manifest["block_size"]
    assert body["volume_id"] == vec.manifest["volume_id"]
    assert store.vol.owner_fingerprint() == vec.manifest["owner_fingerprint"]
    assert body["content_fingerprint"] == vec.manifest["content_fingerprint"]
    assert body["owner_private_key"]["n"] == 2 ** 17 and body["owner_private_key"]["r"] == 8


def test_open_with_expected_fingerprint(copy, vec):
    vol = volume.open_volume(LocalBackend(copy), "", vec.passphrase,
                             expected_fingerprint=vec.manifest["owner_fingerprint"])
    assert vol.volume_id == vec.manifest["volume_id"]


def test_tree_matches_manifest(store, vec):
    tree = walk(store)
    assert set(tree) == set(vec.entries)
    for path, entry in tree.items():
        want = vec.entries[path]
        a = entry.attrs
        assert (a.mode, a.uid, a.gid, a.mtime_ns, a.ctime_ns) == \
            (want["mode"], want["uid"], want["gid"], want["mtime_ns"], want["ctime_ns"]), path
        assert entry.key == want["key"], path
        assert entry.is_dir == (want["type"] == "dir"), path
        assert entry.is_symlink == (want["type"] == "symlink"), path
        if want["type"] == "dir":
            assert stat.S_ISDIR(a.mode) and entry.obj_id.hex() == want["dir_id"]
            continue
        assert entry.size == want["size"], path
        assert entry.obj_id.hex() == want["file_id"], path
        data = store.read_all(entry)
        assert len(data) == want["size"] and hashlib.sha256(data).hexdigest() == want["sha256"], path
        if want["type"] == "symlink":
            assert data == bytes.fromhex(want["target_hex"])
        else:
            assert stat.S_ISREG(a.mode)


@pytest.mark.parametrize("path", [p for p in PATHS if p], ids=lambda p: SETS[1].entries[p]["path"][:40])
def test_lookup_each_path(store, vec, path):
    entry = store.resolve(list(path))
    want = vec.entries[path]
    assert entry.attrs.mode == want["mode"]
    if want["type"] != "dir":
        assert hashlib.sha256(store.read_all(entry)).hexdigest() == want["sha256"]


def test_objects_and_sizes(copy, vec):
    found = {}
    for dirpath, _, names in os.walk(copy):
        for name in names:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, copy).replace(os.sep, "/")] = os.path.getsize(path) - META_BLOCK
    assert found == vec.manifest["objects"]
    bs = vec.manifest["block_size"]
    for e in vec.manifest["entries"]:
        if e["type"] == "dir" and e["path_hex"]:
            assert found[e["key"]] == fmt.DIRENT_SIZE
        elif e["type"] != "dir":
            assert found[e["key"]] == e["object_size"] == fmt.Layout(bs, vec.version).object_size(e["size"])
            assert fmt.Layout(bs, vec.version).plain_size(found[e["key"]]) == e["size"]
    for key in found:
        assert all(len(c) <= 240 for c in key.split("/"))


def test_fsck_clean(store, vec):
    report = fsck.check(store)
    assert report.clean, report.problems
    files = [e for e in vec.manifest["entries"] if e["type"] != "dir"]
    assert report.files == len(files)
    assert report.directories == len(vec.manifest["entries"]) - len(files)
    assert report.bytes == sum(e["size"] for e in files)


# ---------------------------------------------------------------- an independent decoder, from docs/format.md

def _hkdf(ikm, info, length, salt=None):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _oaep(label):
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


def _b32(data):
    return base64.b32encode(data).decode().rstrip("=").lower()


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _object(root, key):
    with open(os.path.join(root, *key.split("/")), "rb") as f:
        raw = f.read()
    return json.loads(raw[:META_BLOCK]), raw[META_BLOCK:]


class SpecDecoder:
    """Reads the volume following docs/format.md, with `cryptography` primitives only."""

    def __init__(self, root, passphrase):
        self.root = root
        _, raw = _object(root, "cryptfs.volume")
        envelope = json.loads(raw)
        body = envelope["body"]
        self.body = body
        assert body["format"] == "cryptfs-volume" and body["version"] in (1, 2)
        self.version = body["version"]
        blob = body["owner_private_key"]
        params = {k: blob[k] for k in ("kdf", "n", "r", "p", "salt", "fingerprint")}
        kek = Scrypt(salt=bytes.fromhex(blob["salt"]), length=32, n=blob["n"], r=blob["r"],
                     p=blob["p"]).derive(passphrase)
        owner_der = AESGCM(kek).decrypt(bytes.fromhex(blob["nonce"]), bytes.fromhex(blob["ciphertext"]),
                                        _canonical(params))
        owner = serialization.load_der_private_key(owner_der, None)
        spki = owner.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        fp = "sha256:" + hashlib.sha256(spki).hexdigest()
        assert fp == body["owner_fingerprint"] == blob["fingerprint"]
        owner.public_key().verify(bytes.fromhex(envelope["signature"]), _canonical(body),
                                  padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                                  hashes.SHA256())
        mine = [r for r in body["recipients"] if r["fingerprint"] == fp][0]
        ck = mine["content_private_key"]
        label = b"cryptfs v1 content private key"
        aes = owner.decrypt(bytes.fromhex(ck["wrapped_key"]), _oaep(label))
        self.content = serialization.load_der_private_key(
            AESGCM(aes).decrypt(bytes.fromhex(ck["nonce"]), bytes.fromhex(ck["ciphertext"]), label), None)
        secret = owner.decrypt(bytes.fromhex(mine["volume_secret"]), _oaep(b"cryptfs v1 volume secret"))
        self.name_key = _hkdf(secret, b"cryptfs v1 name key", 64)
        self.dirhash_key = _hkdf(secret, b"cryptfs v1 directory hash key", 32)
        self.attr_key = _hkdf(secret, b"cryptfs v1 attribute key", 64)
        self.entry_key = _hkdf(secret, b"cryptfs v1 entry key", 64)
        self.block_size = body["block_size"]

    def prefix(self, dir_id):
        return "t/" + _b32(hmac.new(self.dirhash_key, dir_id, hashlib.sha256).digest()[:20]) + "/"

    def key(self, dir_id, name):
        padded = name + b"\x80" + bytes(-(len(name) + 1) % 16)
        enc = _b32(AESSIV(self.name_key).encrypt(padded, [b"cryptfs v1 name", dir_id]))
        return self.prefix(dir_id) + "/".join(enc[i:i + 240] for i in range(0, len(enc), 240))

    def attrs(self, key, obj_id, meta):
        blob = base64.b64decode(meta["cf-attr"])
        plain = AESSIV(self.attr_key).decrypt(blob[16:], [b"cryptfs v1 attrs", key.encode(), obj_id, blob[:16]])
        if len(plain) == 29:
            version, mode, uid, gid, mtime, ctime = struct.unpack(">BIIIqq", plain)
            assert version == 1
        else:
            version, mode, uid, gid, mtime, ctime, _atime, _rdev = struct.unpack(">BIIIqqqQ", plain)
            assert version == 2
        return mode, uid, gid, mtime, ctime

    def directory(self, parent_id, name):
        key = self.key(parent_id, name)
        meta, body = _object(self.root, key)
        assert len(body) == 56 and body[:8] == b"CRYD\x01\x00\x00\x00" and meta["cf-v"] == "1"
        child = AESSIV(self.entry_key).decrypt(body[24:], [b"cryptfs v1 dirent", parent_id, name, body[8:24]])
        assert child == base64.b64decode(meta["cf-id"])
        _, bp = _object(self.root, self.prefix(child) + ".dir")
        assert bp[:8] == b"CRYB\x01\x00\x00\x00"
        back = AESSIV(self.entry_key).decrypt(bp[24:], [b"cryptfs v1 backptr", child, bp[8:24]])
        assert back == parent_id + name
        return child, self.attrs(key, child, meta)

    def file(self, dir_id, name):
        key = self.key(dir_id, name)
        meta, body = _object(self.root, key)
        assert meta["cf-v"] == "1"
        file_id = base64.b64decode(meta["cf-id"])
        data_key = self.content.decrypt(base64.b64decode(meta["cf-key"]), _oaep(b"cryptfs v1 data key"))
        header = body[:56]
        assert header[:4] == b"CRYF" and header[4] == self.version and 1 << header[5] == self.block_size
        assert header[6:8] == b"\0\0" and header[8:24] == file_id
        assert header[24:56] == _hkdf(data_key, b"cryptfs v1 key commitment", 32, salt=file_id)
        block_key = _hkdf(data_key, b"cryptfs v1 block key", 32, salt=file_id)
        bs, ct = self.block_size, self.block_size + 28
        table = 16 if self.version == 2 else 0   # per block, plus a 32-byte MAC at the end
        full, rest = divmod(len(body) - 56 - (32 if table else 0), ct + table)
        size = full * bs + (rest - 28 - table if rest else 0)
        count = max(1, -(-size // bs))
        out = b""
        tags = b""
        for i in range(count):
            start = 56 + i * ct
            block = body[start:start + min(bs, size - i * bs) + 28]
            aad = header + struct.pack(">QB", i, 1 if i == count - 1 else 0)
            out += AESGCM(block_key).decrypt(block[:12], block[12:], aad)
            tags += block[-16:]
        assert len(out) == size
        if table:
            end = 56 + (count - 1) * ct + len(block)
            assert body[end:end + 16 * count] == tags and len(body) == end + 16 * count + 32
            table_key = _hkdf(data_key, b"cryptfs v2 tag table key", 32, salt=file_id)
            mac = hmac.new(table_key, b"cryptfs v2 tag table" + header + struct.pack(">Q", count) + tags,
                           hashlib.sha256).digest()
            assert body[-32:] == mac
        return out, self.attrs(key, file_id, meta)


def test_independent_decoder(copy, vec):
    spec = SpecDecoder(copy, vec.passphrase)
    root_meta, root_bp = _object(copy, spec.prefix(bytes(16)) + ".dir")
    assert root_bp[:8] == b"CRYB\x01\x00\x00\x00"
    assert AESSIV(spec.entry_key).decrypt(root_bp[24:], [b"cryptfs v1 backptr", bytes(16), root_bp[8:24]]) \
        == bytes(16)
    assert spec.attrs(spec.prefix(bytes(16)) + ".dir", bytes(16), root_meta)[0] == vec.entries[()]["mode"]
    dir_ids = {(): bytes(16)}
    for path in sorted(vec.entries, key=len):
        if not path:
            continue
        want = vec.entries[path]
        parent = dir_ids[path[:-1]]
        assert spec.key(parent, path[-1]) == want["key"]
        if want["type"] == "dir":
            child, attrs = spec.directory(parent, path[-1])
            dir_ids[path] = child
        else:
            data, attrs = spec.file(parent, path[-1])
            assert hashlib.sha256(data).hexdigest() == want["sha256"]
        assert attrs == (want["mode"], want["uid"], want["gid"], want["mtime_ns"], want["ctime_ns"])


def test_spec_tables_match_the_code():
    """The worked sizes and name-length table of docs/format.md are what the code computes."""
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "format.md")
    with open(path) as f:
        text = f.read()
    section = text[text.index("Worked sizes with B = 65536"):]
    sizes = re.findall(r"^\| (\d+) \| \d+ \([\d, ]+\) \| (\d+) \| (\d+) \|$", section, re.M)
    assert [int(n) for n, _, _ in sizes] == [0, 1, 65535, 65536, 65537, 131072]
    for n, s1, s2 in sizes:
        assert fmt.Layout(65536, 1).object_size(int(n)) == int(s1)
        assert fmt.Layout(65536, 2).object_size(int(n)) == int(s2)
    vk = fmt.VolumeKeys.derive(bytes(32))
    rows = re.findall(r"^\| (\d+)\.\.(\d+) \| (\d+) \| (\d+) \| ", text, re.M)
    assert len(rows) == 16
    for lo, hi, sealed, chars in rows:
        for n in (int(lo), int(hi)):
            enc = fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"a" * n)
            assert len(enc.replace("/", "")) == int(chars) == -(-int(sealed) * 8 // 5)
