"""The tamper matrix: every alteration of stored bytes is refused, never decrypted to wrong plaintext.

First on the pure format (cryptfs.format), then on a real volume on the local backend (the
object files are tampered on disk: a local object is a 4096-byte JSON metadata block followed
by the object body), then on the signed volume config.
"""

import json
import os
import stat
import uuid

import pytest

from cryptfs import format as fmt
from cryptfs import fsck, keys, volume
from cryptfs.backend.local import META_BLOCK, LocalBackend
from cryptfs.errors import BackendError, FormatError, IntegrityError, KeyMismatch, NotFound, WrongPassphrase
from cryptfs.store import Store

REFUSED = (IntegrityError, FormatError)
BS = 4096                      # pure cases: small blocks keep the matrix fast
B = fmt.DEFAULT_BLOCK_SIZE     # volume cases: the default block size
PASSPHRASE = b"tamper matrix passphrase"

HEADER_FIELDS = {            # field: (first byte, end byte) in the 56-byte header
    "magic": (0, 4), "version": (4, 5), "block_size": (5, 6), "flags": (6, 8),
    "file_id": (8, 24), "commitment": (24, 56),
}


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def blocks_of(body: bytes, bs: int) -> list[bytes]:
    size = fmt.Layout(bs).plain_size(len(body))
    out = []
    for i in range(fmt.block_count(size, bs)):
        start = fmt.Layout(bs).block_offset(i)
        out.append(body[start:start + fmt.block_plain_len(i, size, bs) + fmt.BLOCK_OVERHEAD])
    return out


# ================================================================ pure format

@pytest.fixture(scope="module")
def pure():
    fk = fmt.FileKey.new()
    plain = os.urandom(2 * BS + 100)          # blocks of BS, BS, 100 bytes
    body = fmt.encrypt_file(fk, plain, fmt.Layout(BS))
    assert fmt.decrypt_file(fk, body, fmt.Layout(BS)) == plain
    return fk, plain, body


def refused(fk, body, bs=BS):
    with pytest.raises(REFUSED):
        fmt.decrypt_file(fk, body, fmt.Layout(bs))


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
@pytest.mark.parametrize("bit", [0, 3, 7])
def test_header_bit_flip(pure, field, bit):
    fk, _, body = pure
    start, end = HEADER_FIELDS[field]
    for pos in sorted({start, (start + end - 1) // 2, end - 1}):
        refused(fk, flip(body, pos, bit))


def test_header_every_byte(pure):
    fk, _, body = pure
    for pos in range(fmt.HEADER_SIZE):
        refused(fk, flip(body, pos, pos % 8))


@pytest.mark.parametrize("exp", [e for e in range(0, 256) if e != 12])
def test_header_block_size_byte_any_value(pure, exp):
    fk, _, body = pure
    refused(fk, body[:5] + bytes([exp]) + body[6:])


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_header_future_version_refused(version):
    fk = fmt.FileKey.new()
    body = fmt.encrypt_file(fk, b"data", fmt.Layout(BS))
    with pytest.raises(FormatError, match="version"):
        fmt.decrypt_file(fk, body[:4] + bytes([version]) + body[5:], fmt.Layout(BS))


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("where", ["nonce-first", "nonce-last", "ct-first", "ct-middle", "ct-last",
                                   "tag-first", "tag-last"])
def test_block_bit_flip(pure, block, where):
    fk, _, body = pure
    blen = [BS, BS, 100][block] + fmt.BLOCK_OVERHEAD
    rel = {"nonce-first": 0, "nonce-last": 11, "ct-first": 12, "ct-middle": 12 + (blen - 28) // 2,
           "ct-last": blen - 17, "tag-first": blen - 16, "tag-last": blen - 1}[where]
    refused(fk, flip(body, fmt.Layout(BS).block_offset(block) + rel, 5))


def test_empty_file_block_flips():
    fk = fmt.FileKey.new()
    body = fmt.encrypt_file(fk, b"", fmt.Layout(BS))
    assert len(body) == 132
    for pos in range(len(body)):
        refused(fk, flip(body, pos))


def _cut_points(bs, total):
    points = {0, 1, 55, 56, 57, 56 + 27, 56 + 28, 56 + 29, total - 1, total - 16, total - 28, total - 29}
    for i in range(1, 3):
        boundary = fmt.Layout(bs).block_offset(i)
        points |= {boundary - 1, boundary, boundary + 1, boundary + 27, boundary + 28, boundary + 29}
    return sorted(p for p in points if 0 <= p < total)


def test_truncation(pure):
    fk, _, body = pure
    for cut in _cut_points(BS, len(body)):
        refused(fk, body[:cut])


def test_truncation_to_block_boundary_is_detected_by_last_flag():
    """Version 1: cutting whole blocks leaves a valid size; the missing last-block flag still refuses it."""
    fk, v1 = fmt.FileKey.new(), fmt.Layout(BS, 1)
    body = fmt.encrypt_file(fk, os.urandom(2 * BS + 100), v1)
    for n in (1, 2):
        cut = body[:v1.block_offset(n)]
        assert v1.plain_size(len(cut)) == n * BS   # the size alone looks fine
        with pytest.raises(IntegrityError):
            fmt.decrypt_file(fk, cut, v1)


def test_truncation_to_block_boundary_with_a_shortened_table(pure):
    """Version 2: whole blocks cut and the tag table cut to match give a valid size; the
    table's MAC (over the block count) refuses it."""
    fk, plain, body = pure
    layout = fmt.Layout(BS)
    tags = body[layout.table_extent(len(plain))[0]:][:-fmt.TABLE_MAC_SIZE]
    for n in (1, 2):
        cut = body[:layout.block_offset(n)] + tags[:16 * n] + body[-fmt.TABLE_MAC_SIZE:]
        assert layout.plain_size(len(cut)) == n * BS
        with pytest.raises(IntegrityError):
            fmt.decrypt_file(fk, cut, layout)


@pytest.mark.parametrize("extra", [1, 27, 28, 29, BS + 28, 2 * BS + 56])
def test_appended_garbage(pure, extra):
    fk, _, body = pure
    refused(fk, body + os.urandom(extra))
    refused(fk, body + bytes(extra))


def test_appended_valid_looking_blocks(pure):
    fk, _, body = pure
    blocks = blocks_of(body, BS)
    refused(fk, body + blocks[-1])                           # a copy of the last block
    refused(fk, body + blocks[0])                            # a copy of a full block
    # even a properly encrypted extra block (not possible without the key) is refused:
    # the old last block carries the last flag
    refused(fk, body + fmt.encrypt_block(fk, body[:56], 3, b"more", True))
    full = fmt.encrypt_file(fk, os.urandom(2 * BS), fmt.Layout(BS))
    refused(fk, full + fmt.encrypt_block(fk, full[:56], 2, b"z", True))


def test_blocks_reordered(pure):
    fk, _, body = pure
    b0, b1, b2 = blocks_of(body, BS)
    refused(fk, body[:56] + b1 + b0 + b2)
    full = fmt.encrypt_file(fk, os.urandom(3 * BS), fmt.Layout(BS))
    c0, c1, c2 = blocks_of(full, BS)
    for order in ((c0, c2, c1), (c1, c0, c2), (c2, c1, c0), (c1, c2, c0)):
        refused(fk, full[:56] + b"".join(order))


def test_block_duplicated(pure):
    fk, _, body = pure
    b0, b1, b2 = blocks_of(body, BS)
    refused(fk, body[:56] + b0 + b0 + b2)


def test_block_from_another_file_different_key(pure):
    fk, _, body = pure
    other = fmt.encrypt_file(fmt.FileKey.new(), os.urandom(2 * BS + 100), fmt.Layout(BS))
    mine, theirs = blocks_of(body, BS), blocks_of(other, BS)
    for i in range(3):
        swapped = mine[:i] + [theirs[i]] + mine[i + 1:]
        refused(fk, body[:56] + b"".join(swapped))


def test_block_from_another_file_same_data_key(pure):
    """Same data key, different file id: the block key and header (AAD) differ."""
    fk, _, body = pure
    twin = fmt.FileKey.derive(fk.data_key, os.urandom(16))
    other = fmt.encrypt_file(twin, os.urandom(2 * BS + 100), fmt.Layout(BS))
    mine, theirs = blocks_of(body, BS), blocks_of(other, BS)
    for i in range(3):
        swapped = mine[:i] + [theirs[i]] + mine[i + 1:]
        refused(fk, body[:56] + b"".join(swapped))
    # and the other file's header with its blocks is refused under this file's key
    refused(fk, other)


def test_block_from_same_key_other_index(pure):
    """Under the very same file key, a block only decrypts at its own index."""
    fk, _, body = pure
    other = fmt.encrypt_file(fk, os.urandom(3 * BS), fmt.Layout(BS))
    theirs = blocks_of(other, BS)
    mine = blocks_of(body, BS)
    refused(fk, body[:56] + theirs[1] + mine[1] + mine[2])
    refused(fk, body[:56] + mine[0] + theirs[0] + mine[2])


def test_header_swapped_from_another_file(pure):
    fk, _, body = pure
    other = fmt.encrypt_file(fmt.FileKey.new(), b"x", fmt.Layout(BS))
    refused(fk, other[:56] + body[56:])


@pytest.fixture(scope="module")
def content_key():
    return keys.generate_rsa(2048)


def test_wrapped_key_replaced_commitment(pure, content_key):
    """Metadata carrying another file's wrapped key: it unwraps, but fails the key commitment."""
    fk, _, body = pure
    other = fmt.FileKey.new()
    wrapped_other = keys.wrap(content_key.public_key(), other.data_key, keys.DATA_KEY_LABEL)
    data_key = keys.unwrap(content_key, wrapped_other, keys.DATA_KEY_LABEL)
    wrong = fmt.FileKey.derive(data_key, fk.file_id)      # file id from this file's metadata
    with pytest.raises(IntegrityError, match="commitment"):
        fmt.check_commitment(wrong, fmt.parse_header(body))
    with pytest.raises(IntegrityError, match="commitment"):
        fmt.decrypt_file(wrong, body, fmt.Layout(BS))


@pytest.mark.parametrize("bs", [BS, B])
def test_wrong_block_size_claimed(bs):
    fk = fmt.FileKey.new()
    body = fmt.encrypt_file(fk, os.urandom(100), fmt.Layout(bs))
    other = BS if bs == B else B
    with pytest.raises(FormatError):
        fmt.decrypt_file(fk, body, fmt.Layout(other))
    patched = body[:5] + bytes([fmt.log2_block_size(other)]) + body[6:]
    refused(fk, patched, other)


def test_attr_blob_tampering():
    vk = fmt.VolumeKeys.derive(os.urandom(32))
    a_id, b_id = os.urandom(16), os.urandom(16)
    attrs = fmt.Attrs(stat.S_IFREG | 0o600, 1, 2, 3, 4)
    blob_a = fmt.encrypt_attrs(vk, "t/p/aaaa", a_id, attrs)
    blob_b = fmt.encrypt_attrs(vk, "t/p/bbbb", b_id, attrs)
    for pos in range(len(blob_a)):
        with pytest.raises(IntegrityError):
            fmt.decrypt_attrs(vk, "t/p/aaaa", a_id, flip(blob_a, pos))
    with pytest.raises(IntegrityError):        # copied from another object
        fmt.decrypt_attrs(vk, "t/p/aaaa", a_id, blob_b)
    with pytest.raises(IntegrityError):        # copied with the other object's id too
        fmt.decrypt_attrs(vk, "t/p/aaaa", b_id, blob_b)
    with pytest.raises(IntegrityError):        # moved under another object key
        fmt.decrypt_attrs(vk, "t/p/cccc", a_id, blob_a)


def test_dirent_and_backptr_tampering():
    vk = fmt.VolumeKeys.derive(os.urandom(32))
    parent, child = os.urandom(16), os.urandom(16)
    body = fmt.encrypt_dirent(vk, parent, b"dir", child)
    for pos in range(len(body)):
        with pytest.raises(REFUSED):
            fmt.decrypt_dirent(vk, parent, b"dir", flip(body, pos))
    other = fmt.encrypt_dirent(vk, parent, b"other", os.urandom(16))
    with pytest.raises(IntegrityError):
        fmt.decrypt_dirent(vk, parent, b"dir", other)
    bp = fmt.encrypt_backptr(vk, child, parent, b"dir")
    for pos in range(len(bp)):
        with pytest.raises(REFUSED):
            fmt.decrypt_backptr(vk, child, flip(bp, pos))
    with pytest.raises(IntegrityError):
        fmt.decrypt_backptr(vk, child, fmt.encrypt_backptr(vk, os.urandom(16), parent, b"dir"))


# ================================================================ a real volume on the local backend

@pytest.fixture(scope="module")
def state_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("state"))


@pytest.fixture(autouse=True)
def _state_dir(monkeypatch, state_root):
    monkeypatch.setenv("CRYPTFS_STATE_DIR", state_root)


def _new_volume(tmp_path_factory, state_root, name, rsa_bits=2048):
    root = str(tmp_path_factory.mktemp(name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTFS_STATE_DIR", state_root)
        vol = volume.create(LocalBackend(root), "", PASSPHRASE, rsa_bits=rsa_bits)
        Store(vol).init_root(fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 1, 1))
    return root, vol


class Env:
    """A writer store (the volume as created) and a reader store (opened again, own key cache)."""

    def __init__(self, root, writer, reader):
        self.root, self.writer, self.reader = root, writer, reader

    def path(self, rel_key: str) -> str:
        return os.path.join(self.root, *self.writer.abs_key(rel_key).split("/"))

    def write(self, size: int, parent: bytes = fmt.ROOT_DIR_ID, name: bytes | None = None,
              existing=None):
        name = name or uuid.uuid4().hex.encode()
        data = os.urandom(size)
        entry = self.writer.write_bytes(parent, name, data,
                                        fmt.Attrs(stat.S_IFREG | 0o644, 1000, 1000, 10, 20), existing)
        return name, data, entry

    def read(self, name: bytes, parent: bytes = fmt.ROOT_DIR_ID) -> bytes:
        entry, _ = self.reader.lookup(parent, name)
        return self.reader.read_all(entry)

    def refused(self, name: bytes, parent: bytes = fmt.ROOT_DIR_ID) -> None:
        with pytest.raises(REFUSED):
            self.read(name, parent)


def load_obj(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    return json.loads(raw[:META_BLOCK]), raw[META_BLOCK:]


def save_obj(path: str, meta: dict, body: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(json.dumps(meta).encode().ljust(META_BLOCK, b" ") + body)


def set_meta_field(path, field, value):
    meta, body = load_obj(path)
    meta[field] = value
    save_obj(path, meta, body)


@pytest.fixture(scope="module")
def env(tmp_path_factory, state_root):
    root, vol = _new_volume(tmp_path_factory, state_root, "tamper-volume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYPTFS_STATE_DIR", state_root)
        reader_vol = volume.open_volume(LocalBackend(root), "", PASSPHRASE)
    return Env(root, Store(vol), Store(reader_vol))


@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, 2 * B, 2 * B + 1])
def test_volume_untampered_reads_back(env, size):
    name, data, entry = env.write(size)
    assert os.path.getsize(env.path(entry.key)) == META_BLOCK + fmt.Layout(B).object_size(size)
    assert env.read(name) == data


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
def test_volume_header_flip(env, field):
    start, end = HEADER_FIELDS[field]
    for pos in (start, end - 1):
        name, _, entry = env.write(B + 10)
        path = env.path(entry.key)
        meta, body = load_obj(path)
        save_obj(path, meta, flip(body, pos, 1))
        env.refused(name)


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_volume_block_flip(env, block, where):
    name, _, entry = env.write(2 * B + 1)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    blen = (B if block < 2 else 1) + fmt.BLOCK_OVERHEAD
    rel = {"nonce": 5, "ciphertext": 12 + (blen - 28) // 2, "tag": blen - 3}[where]
    save_obj(path, meta, flip(body, fmt.Layout(B).block_offset(block) + rel, 6))
    env.refused(name)


@pytest.mark.parametrize("cut", ["empty", "header-only", "header+1", "header+27", "block-1-boundary",
                                 "block-2-boundary", "block-1+1", "block-1+28", "block-2-1",
                                 "one-byte-short"])
def test_volume_truncation(env, cut):
    name, _, entry = env.write(2 * B + 1)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    at = {"empty": 0, "header-only": 56, "header+1": 57, "header+27": 83,
          "block-1-boundary": fmt.Layout(B).block_offset(1), "block-2-boundary": fmt.Layout(B).block_offset(2),
          "block-1+1": fmt.Layout(B).block_offset(1) + 1, "block-1+28": fmt.Layout(B).block_offset(1) + 28,
          "block-2-1": fmt.Layout(B).block_offset(2) - 1, "one-byte-short": len(body) - 1}[cut]
    save_obj(path, meta, body[:at])
    env.refused(name)


@pytest.mark.parametrize("size", [0, 1, B, B + 1])
@pytest.mark.parametrize("extra", ["1-byte", "28-bytes", "whole-block", "copy-of-last-block"])
def test_volume_appended(env, size, extra):
    name, _, entry = env.write(size)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    tail = {"1-byte": b"\0", "28-bytes": os.urandom(28), "whole-block": os.urandom(B + 28),
            "copy-of-last-block": blocks_of(body, B)[-1]}[extra]
    save_obj(path, meta, body + tail)
    env.refused(name)


def test_volume_blocks_reordered(env):
    name, _, entry = env.write(3 * B)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    b0, b1, b2 = blocks_of(body, B)
    save_obj(path, meta, body[:56] + b1 + b0 + b2)
    env.refused(name)
    save_obj(path, meta, body[:56] + b0 + b2 + b1)
    env.refused(name)
    save_obj(path, meta, body)
    env.read(name)  # put back, it reads again


def test_volume_block_from_another_file(env):
    name, _, entry = env.write(2 * B + 1)
    _, _, other = env.write(2 * B + 1)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    _, other_body = load_obj(env.path(other.key))
    mine, theirs = blocks_of(body, B), blocks_of(other_body, B)
    for i in range(3):
        save_obj(path, meta, body[:56] + b"".join(mine[:i] + [theirs[i]] + mine[i + 1:]))
        env.refused(name)


def test_volume_block_from_previous_version_of_same_file(env):
    """A rewrite keeps the file id but takes a fresh data key: old blocks do not fit the new file."""
    name, _, entry = env.write(2 * B + 1)
    _, old_body = load_obj(env.path(entry.key))
    _, new_data, new_entry = env.write(2 * B + 1, name=name, existing=entry)
    assert new_entry.obj_id == entry.obj_id and new_entry.key == entry.key
    path = env.path(new_entry.key)
    meta, body = load_obj(path)
    assert body[8:24] == old_body[8:24] and body[24:56] != old_body[24:56]
    mine, old = blocks_of(body, B), blocks_of(old_body, B)
    for i in range(3):
        save_obj(path, meta, body[:56] + b"".join(mine[:i] + [old[i]] + mine[i + 1:]))
        env.refused(name)
    save_obj(path, meta, old_body[:56] + body[56:])     # old header, new blocks
    env.refused(name)
    save_obj(path, meta, body)
    assert env.read(name) == new_data


def test_volume_wrapped_key_replaced(env):
    name, _, entry = env.write(100)
    _, _, other = env.write(100)
    path = env.path(entry.key)
    other_meta, _ = load_obj(env.path(other.key))
    set_meta_field(path, fmt.META_KEY, other_meta[fmt.META_KEY])
    with pytest.raises(IntegrityError, match="commitment"):
        env.read(name)


def test_volume_wrapped_key_garbage(env):
    name, _, entry = env.write(100)
    path = env.path(entry.key)
    meta, _ = load_obj(path)
    wrapped = fmt.b64d(meta[fmt.META_KEY])
    set_meta_field(path, fmt.META_KEY, fmt.b64e(flip(wrapped, 77)))
    env.refused(name)
    set_meta_field(path, fmt.META_KEY, "###")
    env.refused(name)
    meta.pop(fmt.META_KEY)
    save_obj(path, meta, load_obj(path)[1])
    env.refused(name)


def test_volume_attr_blob_altered(env):
    name, _, entry = env.write(10)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    blob = fmt.b64d(meta[fmt.META_ATTR])
    for pos in (0, 15, 16, 31, 32, len(blob) - 1):
        save_obj(path, {**meta, fmt.META_ATTR: fmt.b64e(flip(blob, pos))}, body)
        env.refused(name)
    save_obj(path, {**meta, fmt.META_ATTR: fmt.b64e(blob[:-1])}, body)
    env.refused(name)


def test_volume_attr_blob_copied_from_another_object(env):
    name, _, entry = env.write(10)
    _, _, other = env.write(10)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    other_meta, _ = load_obj(env.path(other.key))
    save_obj(path, {**meta, fmt.META_ATTR: other_meta[fmt.META_ATTR]}, body)
    env.refused(name)
    # with the other object's id as well
    save_obj(path, {**meta, fmt.META_ATTR: other_meta[fmt.META_ATTR], fmt.META_ID: other_meta[fmt.META_ID]},
             body)
    env.refused(name)
    # the other object's whole metadata (wrapped key, id, attributes) over this body
    save_obj(path, other_meta, body)
    env.refused(name)


def test_volume_object_id_replaced(env):
    name, _, entry = env.write(10)
    path = env.path(entry.key)
    set_meta_field(path, fmt.META_ID, fmt.b64e(os.urandom(16)))
    env.refused(name)


def test_volume_metadata_version_or_missing(env):
    name, _, entry = env.write(10)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    save_obj(path, {**meta, fmt.META_VERSION: "2"}, body)
    env.refused(name)
    save_obj(path, {}, body)
    env.refused(name)


def test_volume_whole_object_under_another_name(env):
    """A whole file object (body and metadata) copied or moved under another name is refused."""
    name_a, _, a = env.write(300)
    name_b, data_b, b = env.write(300)
    raw_a = open(env.path(a.key), "rb").read()
    # copied over an existing name
    with open(env.path(b.key), "wb") as f:
        f.write(raw_a)
    env.refused(name_b)
    # copied under a new name in the same directory
    new_name = b"brand-new-" + uuid.uuid4().hex.encode()
    new_path = env.path(env.writer.entry_key(fmt.ROOT_DIR_ID, new_name))
    os.makedirs(os.path.dirname(new_path), exist_ok=True)
    with open(new_path, "wb") as f:
        f.write(raw_a)
    env.refused(new_name)
    # moved under the same name in another directory
    sub = env.writer.mkdir(fmt.ROOT_DIR_ID, uuid.uuid4().hex.encode(),
                           fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 1, 1))
    moved = env.path(env.writer.entry_key(sub.obj_id, name_a))
    os.makedirs(os.path.dirname(moved), exist_ok=True)
    os.replace(env.path(a.key), moved)
    env.refused(name_a, sub.obj_id)
    # put back where it belongs, it reads again
    os.replace(moved, env.path(a.key))
    assert len(env.read(name_a)) == 300


def test_volume_directory_entry_tampering(env):
    attrs = fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 1, 1)
    d1 = env.writer.mkdir(fmt.ROOT_DIR_ID, b"d1-" + uuid.uuid4().hex.encode(), attrs)
    d2 = env.writer.mkdir(fmt.ROOT_DIR_ID, b"d2-" + uuid.uuid4().hex.encode(), attrs)
    p1, p2 = env.path(d1.key), env.path(d2.key)
    raw1, raw2 = open(p1, "rb").read(), open(p2, "rb").read()
    assert env.reader.lookup(fmt.ROOT_DIR_ID, d1.name)[0].obj_id == d1.obj_id

    def refused_dir(name):
        with pytest.raises(REFUSED):
            env.reader.lookup(fmt.ROOT_DIR_ID, name)

    meta1, body1 = load_obj(p1)
    meta2, body2 = load_obj(p2)
    for pos in range(fmt.DIRENT_SIZE):                 # any flip of the entry body
        save_obj(p1, meta1, flip(body1, pos))
        refused_dir(d1.name)
    save_obj(p1, meta1, body2)                         # another directory's entry body
    refused_dir(d1.name)
    save_obj(p1, {**meta1, fmt.META_ID: meta2[fmt.META_ID]}, body1)   # points at another directory
    refused_dir(d1.name)
    save_obj(p1, {**meta1, fmt.META_ATTR: meta2[fmt.META_ATTR]}, body1)
    refused_dir(d1.name)
    with open(p1, "wb") as f:                          # whole entry copied under another name
        f.write(raw2)
    refused_dir(d1.name)
    with open(p1, "wb") as f:
        f.write(raw1)
    assert env.reader.lookup(fmt.ROOT_DIR_ID, d1.name)[0].obj_id == d1.obj_id


def test_volume_file_body_as_directory_entry(env):
    """A file object cut to 56 bytes reads as a directory entry size; it is still refused."""
    name, _, entry = env.write(100)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    save_obj(path, meta, body[:fmt.DIRENT_SIZE])
    env.refused(name)


def test_volume_fsck_names_tampered_objects(env):
    """fsck walks the tree and names what it cannot authenticate (the module's volume has many)."""
    name, _, entry = env.write(B + 5)
    path = env.path(entry.key)
    meta, body = load_obj(path)
    save_obj(path, meta, flip(body, fmt.Layout(B).block_offset(1) + 20))
    name2, _, entry2 = env.write(7)
    set_meta_field(env.path(entry2.key), fmt.META_ATTR, load_obj(env.path(entry.key))[0][fmt.META_ATTR])
    report = fsck.check(env.reader)
    assert not report.clean
    where = {w for _, w, _ in report.problems}
    assert "/" + name.decode() in where
    assert "/" + name2.decode() in where


# ================================================================ local backend object files

def _local_dir(env, n=3):
    """A directory holding n small files and one subdirectory; returns (dir entry, names, subdir)."""
    attrs = fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 1, 1)
    d = env.writer.mkdir(fmt.ROOT_DIR_ID, b"local-" + uuid.uuid4().hex.encode(), attrs)
    names = [env.write(10 + i, parent=d.obj_id, name=f"f{i}".encode())[0] for i in range(n)]
    sub = env.writer.mkdir(d.obj_id, b"sub", attrs)
    return d, names, sub


def _findings(env) -> dict[str, str]:
    return {where: kind for kind, where, _ in fsck.check(env.reader).problems}


def _listed(env, d) -> list[bytes]:
    """Names `cryptfs ls -l` and the mount show (both skip what they cannot authenticate)."""
    from cryptfs.namespace import AttrDB, Namespace
    ns = Namespace(env.reader, AttrDB(None), ttl=0)
    try:
        mounted = sorted(name for name, _ in ns.listdir(d.obj_id))
    finally:
        ns.close()
    assert mounted == sorted(e.name for e in env.reader.list_entries(d.obj_id))
    return mounted


@pytest.mark.parametrize("which", ["file", "directory"])
@pytest.mark.parametrize("damage", ["garbage", "not-json-object", "zeros"])
def test_local_corrupt_entry_skipped_not_fatal(env, which, damage):
    d, names, sub = _local_dir(env)
    bad = env.path(env.writer.entry_key(d.obj_id, b"f1" if which == "file" else b"sub"))
    with open(bad, "r+b") as f:
        f.write({"garbage": b"\x00{not json", "not-json-object": b"[1, 2]".ljust(16),
                 "zeros": bytes(META_BLOCK)}[damage])
    rest = sorted({*names, b"sub"} - {b"f1" if which == "file" else b"sub"})
    assert _listed(env, d) == rest
    with pytest.raises(FormatError, match="metadata block"):
        env.reader.lookup(d.obj_id, b"f1" if which == "file" else b"sub")
    assert env.read(b"f0", d.obj_id)[:1]                  # the others still read
    where = f"/{d.name.decode()}/{'f1' if which == 'file' else 'sub'}"
    assert _findings(env).get(where) == "metadata"


@pytest.mark.parametrize("size", [0, 1, 100, META_BLOCK - 1])
def test_local_object_truncated_below_metadata_block(env, size):
    d, names, _ = _local_dir(env, 2)
    path = env.path(env.writer.entry_key(d.obj_id, b"f0"))
    os.truncate(path, size)
    assert [i.size for i in env.reader.backend.list(path[len(env.root) + 1:])] == [0]
    assert _listed(env, d) == [b"f1", b"sub"]
    with pytest.raises(FormatError):
        env.reader.lookup(d.obj_id, b"f0")
    assert _findings(env).get(f"/{d.name.decode()}/f0") == "metadata"


@pytest.mark.parametrize("what", ["empty-directory", "directory", "symlink-to-object", "symlink-outside",
                                  "dangling-symlink", "fifo"])
def test_local_object_replaced_is_found_not_followed(env, tmp_path, what):
    d, names, _ = _local_dir(env, 2)
    path = env.path(env.writer.entry_key(d.obj_id, b"f0"))
    other = env.path(env.writer.entry_key(d.obj_id, b"f1"))
    outside = tmp_path / "outside"
    outside.write_bytes(open(other, "rb").read())            # a valid object file, out of reach
    os.unlink(path)
    if what == "empty-directory":
        os.mkdir(path)
    elif what == "directory":
        os.mkdir(path)
        save_obj(os.path.join(path, "x"), *load_obj(other))
    elif what == "fifo":
        os.mkfifo(path)
    else:
        os.symlink({"symlink-to-object": other, "symlink-outside": str(outside),
                    "dangling-symlink": str(tmp_path / "nothing")}[what], path)
    with pytest.raises(NotFound if what in ("empty-directory", "directory") else FormatError):
        env.reader.lookup(d.obj_id, b"f0")
    assert _listed(env, d) == [b"f1", b"sub"]
    findings = _findings(env)
    if what == "empty-directory":  # what a delete killed half-way leaves: no object, as on S3
        assert f"/{d.name.decode()}/f0" not in findings
    elif what == "directory":   # a prefix with objects below it: those are named, as on S3
        assert findings.get(env.writer.abs_key(env.writer.entry_key(d.obj_id, b"f0")) + "/x") == "foreign"
    else:
        assert findings.get(f"/{d.name.decode()}/f0") == "metadata"
    env.writer.backend.delete(env.writer.abs_key(env.writer.entry_key(d.obj_id, b"f0")))
    assert outside.read_bytes() == open(other, "rb").read()  # a delete never reaches through


def test_local_directory_replaced_by_symlink_is_never_followed(env, tmp_path):
    """A directory's prefix turned into a symlink to somewhere else: nothing is read, listed,
    written or deleted through it, and fsck names it."""
    d, names, _ = _local_dir(env, 2)
    prefix_dir = env.path(fmt.dir_prefix(env.writer.vk, d.obj_id).rstrip("/"))
    elsewhere = tmp_path / "elsewhere"
    os.rename(prefix_dir, elsewhere)
    os.symlink(elsewhere, prefix_dir)
    before = sorted(os.listdir(elsewhere))
    assert _listed(env, d) == []
    with pytest.raises(NotFound):
        env.reader.lookup(d.obj_id, b"f0")
    with pytest.raises(BackendError, match="symlinks are never followed"):
        env.write(5, parent=d.obj_id, name=b"new")
    env.writer.backend.delete(env.writer.abs_key(env.writer.entry_key(d.obj_id, b"f1")))
    assert sorted(os.listdir(elsewhere)) == before           # nothing written or deleted there
    findings = _findings(env)
    assert findings.get(f"/{d.name.decode()}") == "stale-directory"
    assert findings.get(env.writer.abs_key(fmt.dir_prefix(env.writer.vk, d.obj_id).rstrip("/"))) == "foreign"


def test_local_corrupt_entry_cli(env):
    """`cryptfs ls -l` shows the rest and warns about the bad one; `cryptfs fsck` exits 5 naming it."""
    from conftest import run_cli
    d, names, _ = _local_dir(env, 2)
    with open(env.path(env.writer.entry_key(d.obj_id, b"f0")), "r+b") as f:
        f.write(b"\xff\xfe")
    cli_env = {"CRYPTFS_PASSPHRASE": PASSPHRASE.decode(), "CRYPTFS_STATE_DIR": os.environ["CRYPTFS_STATE_DIR"]}
    url = "file://" + env.root
    code, out, err = run_cli("ls", "-l", f"{url}/{d.name.decode()}", env=cli_env)
    assert code == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == ["f1", "sub"]
    assert "metadata block" in err and "Traceback" not in err
    code, out, err = run_cli("fsck", url, env=cli_env)
    assert code == 5, (out, err)
    assert f"/{d.name.decode()}/f0" in out + err


# ================================================================ the volume config

@pytest.fixture(scope="module")
def cfg(tmp_path_factory, state_root):
    root, vol = _new_volume(tmp_path_factory, state_root, "config-volume")
    paths = [os.path.join(root, volume.CONFIG_NAME), os.path.join(root, volume.BACKUP_NAME)]
    originals = {p: open(p, "rb").read() for p in paths}
    return root, vol, originals


@pytest.fixture
def config(cfg):
    """(root, envelope, write(envelope)); the original config is put back afterwards."""
    root, vol, originals = cfg

    def write(envelope):
        raw = json.dumps(envelope, indent=1, sort_keys=True).encode()
        for p in originals:
            save_obj(p, load_obj(p)[0], raw)
    yield root, json.loads(load_obj(next(iter(originals)))[1]), write
    for p, raw in originals.items():
        with open(p, "wb") as f:
            f.write(raw)


def _open(root, passphrase=PASSPHRASE, **kw):
    return volume.open_volume(LocalBackend(root), "", passphrase, **kw)


def _resign(body, key):
    return {"body": body, "signature": keys.sign(key, keys.canonical_json(body)).hex()}


@pytest.fixture(scope="module")
def attacker():
    return keys.generate_rsa(2048)


def test_config_untampered_opens(config):
    root, envelope, _ = config
    vol = _open(root)
    assert vol.body == envelope["body"]
    assert _open(root, expected_fingerprint=envelope["body"]["owner_fingerprint"]).volume_id == vol.volume_id


def test_config_expected_fingerprint_mismatch(config, attacker):
    root, _, _ = config
    with pytest.raises(KeyMismatch):
        _open(root, expected_fingerprint=keys.fingerprint(attacker))


def test_config_body_edited_content_key_swapped(config, attacker):
    root, envelope, write = config
    envelope["body"]["content_public_key"] = keys.public_pem(attacker)
    write(envelope)
    with pytest.raises(KeyMismatch, match="signature"):
        _open(root)
    envelope["body"]["content_fingerprint"] = keys.fingerprint(attacker)
    write(envelope)
    with pytest.raises(KeyMismatch, match="signature"):
        _open(root)


@pytest.mark.parametrize("edit", ["generation", "block_size", "volume_id", "signature-bit"])
def test_config_other_edits(config, edit):
    root, envelope, write = config
    if edit == "generation":
        envelope["body"]["generation"] += 5
    elif edit == "block_size":
        envelope["body"]["block_size"] = 4096
    elif edit == "volume_id":
        envelope["body"]["volume_id"] = os.urandom(16).hex()
    else:
        sig = bytes.fromhex(envelope["signature"])
        envelope["signature"] = flip(sig, 10).hex()
    write(envelope)
    with pytest.raises(KeyMismatch):
        _open(root)


def test_config_owner_key_replaced_and_resigned(config, attacker):
    root, envelope, write = config
    body = envelope["body"]
    # owner public key and fingerprint swapped for the attacker's, signed with the attacker's key
    forged = {**body, "owner_public_key": keys.public_pem(attacker),
              "owner_fingerprint": keys.fingerprint(attacker)}
    write(_resign(forged, attacker))
    with pytest.raises(KeyMismatch):
        _open(root)
    # only the public key swapped (fingerprint kept), re-signed by the attacker
    write(_resign({**body, "owner_public_key": keys.public_pem(attacker)}, attacker))
    with pytest.raises(KeyMismatch):
        _open(root)
    # the body unchanged but re-signed by the attacker
    write(_resign(body, attacker))
    with pytest.raises(KeyMismatch, match="signature"):
        _open(root)


def test_config_owner_private_key_replaced(config, attacker):
    """The attacker's own key under another passphrase: the owner's passphrase does not open it."""
    root, envelope, write = config
    body = dict(envelope["body"])
    body["owner_private_key"] = keys.protect_private_key(attacker, b"attacker passphrase")
    body["owner_public_key"] = keys.public_pem(attacker)
    body["owner_fingerprint"] = keys.fingerprint(attacker)
    write(_resign(body, attacker))
    with pytest.raises(WrongPassphrase):
        _open(root)


def test_config_recipient_added_without_owner_key(config, attacker):
    root, envelope, write = config
    body = envelope["body"]
    mallory = {"name": "mallory", "fingerprint": keys.fingerprint(attacker),
               "public_key": keys.public_pem(attacker),
               "content_private_key": keys.wrap_private_key(attacker.public_key(), keys.generate_rsa(2048)),
               "volume_secret": keys.wrap(attacker.public_key(), os.urandom(32), keys.SECRET_LABEL).hex()}
    body["recipients"].append(mallory)
    write(envelope)
    with pytest.raises(KeyMismatch, match="signature"):
        _open(root)
    # nor by replacing the owner's own recipient record
    body["recipients"] = [{**body["recipients"][0], "volume_secret": mallory["volume_secret"]}]
    write(envelope)
    with pytest.raises(KeyMismatch, match="signature"):
        _open(root)


def test_config_scrypt_parameters_lowered(config):
    root, envelope, write = config
    envelope["body"]["owner_private_key"]["n"] = 2 ** 14
    write(envelope)
    with pytest.raises(FormatError):
        _open(root)


@pytest.mark.parametrize("edit", ["version", "format", "not-json", "no-signature"])
def test_config_unknown_version_or_malformed(config, edit):
    root, envelope, write = config
    if edit == "version":
        envelope["body"]["version"] = 3
    elif edit == "format":
        envelope["body"]["format"] = "something-else"
    elif edit == "no-signature":
        del envelope["signature"]
    write(envelope)
    if edit == "not-json":
        for p in (volume.CONFIG_NAME, volume.BACKUP_NAME):
            with open(os.path.join(root, p), "r+b") as f:
                f.seek(META_BLOCK)
                f.write(b"{{{{")
    with pytest.raises(FormatError):
        _open(root)


def test_config_generation_rollback(tmp_path_factory, state_root, monkeypatch):
    root, vol = _new_volume(tmp_path_factory, state_root, "rollback-volume")
    paths = [os.path.join(root, volume.CONFIG_NAME), os.path.join(root, volume.BACKUP_NAME)]
    gen1 = {p: open(p, "rb").read() for p in paths}
    vol.change_passphrase(b"new passphrase")
    assert vol.body["generation"] == 2
    assert _open(root, b"new passphrase").body["generation"] == 2
    with pytest.raises(WrongPassphrase):
        _open(root)
    for p, raw in gen1.items():        # the bucket serves the old, validly signed config again
        with open(p, "wb") as f:
            f.write(raw)
    with pytest.raises(IntegrityError, match="generation"):
        _open(root)
    # the record is per machine: one that never saw generation 2 cannot tell
    monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path_factory.mktemp("fresh-state")))
    assert _open(root).body["generation"] == 1
