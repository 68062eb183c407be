"""Pure unit and property tests of the in-bucket format (cryptfs.format) and keys (cryptfs.keys).

No backend, no volume: bytes in, bytes out.
"""

import base64
import hashlib
import os
import re
import stat
import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptfs import format as fmt
from cryptfs import keys
from cryptfs.errors import FormatError, IntegrityError, NameTooLong, ReadOnly, WrongPassphrase

B = fmt.DEFAULT_BLOCK_SIZE
SMALL = 4096
KEY_CHARS = re.compile(r"^[a-z2-7]+(/[a-z2-7]+)*$")


def sizes_for(bs):
    return [0, 1, bs - 1, bs, bs + 1, 2 * bs, 2 * bs + 1]


@pytest.fixture(scope="module")
def vk():
    return fmt.VolumeKeys.derive(b"\x01" * 32)


@pytest.fixture(scope="module")
def rsa2048():
    return keys.generate_rsa(2048)


def _hkdf(ikm, info, length=32, salt=None):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# ---------------------------------------------------------------- constants

def test_constants():
    assert fmt.VERSION == 2 and fmt.VERSIONS == (1, 2) and fmt.ENTRY_VERSION == 1
    assert fmt.HEADER_SIZE == 56
    assert fmt.BLOCK_OVERHEAD == 28
    assert fmt.TAG_SIZE == 16 and fmt.TABLE_MAC_SIZE == 32
    assert fmt.DIRENT_SIZE == 56
    assert fmt.DEFAULT_BLOCK_SIZE == 65536
    assert fmt.NAME_MAX == 255
    assert fmt.NAME_COMPONENT_MAX == 240
    assert fmt.ROOT_DIR_ID == bytes(16)
    for version in fmt.VERSIONS:
        # a directory entry can never be mistaken for a file object
        assert fmt.DIRENT_SIZE < fmt.Layout(SMALL, version).object_size(0)
        for bs in (SMALL, B):
            with pytest.raises(FormatError):
                fmt.Layout(bs, version).plain_size(fmt.DIRENT_SIZE)


def test_layout_refuses_unknown_versions_and_block_sizes():
    for version in (0, 3):
        with pytest.raises(FormatError):
            fmt.Layout(B, version)
    with pytest.raises(FormatError):
        fmt.Layout(1000)


# ---------------------------------------------------------------- sizes

# (version, bytes besides blocks, bytes per block besides its plaintext)
LAYOUTS = [(1, 56, 28), (2, 56 + 32, 28 + 16)]


@pytest.mark.parametrize("version,fixed,per", LAYOUTS)
@pytest.mark.parametrize("bs", [SMALL, B])
@pytest.mark.parametrize("which", range(7))
def test_size_mapping_both_ways(bs, which, version, fixed, per):
    n = sizes_for(bs)[which]
    obj = fmt.Layout(bs, version).object_size(n)
    assert obj == fixed + n + per * max(1, -(-n // bs))
    assert fmt.Layout(bs, version).plain_size(obj) == n


@pytest.mark.parametrize("version,table", [
    (1, {0: 84, 1: 85, 65535: 65619, 65536: 65620, 65537: 65649, 131072: 131184, 131073: 131213}),
    (2, {0: 132, 1: 133, 65535: 65667, 65536: 65668, 65537: 65713, 131072: 131248, 131073: 131293})])
def test_worked_sizes_default_block(version, table):
    for n, obj in table.items():
        assert fmt.Layout(B, version).object_size(n) == obj
        assert fmt.Layout(B, version).plain_size(obj) == n


def test_object_size_negative():
    with pytest.raises(ValueError):
        fmt.Layout(B).object_size(-1)


@pytest.mark.parametrize("version,fixed,per", LAYOUTS)
@pytest.mark.parametrize("bs", [SMALL, B])
def test_invalid_short_objects(bs, version, fixed, per):
    # empty, shorter than a header, header only, header + less than one empty block
    layout = fmt.Layout(bs, version)
    for obj in list(range(0, fixed)) + [fixed] + [fixed + k for k in range(1, per)]:
        with pytest.raises(FormatError):
            layout.plain_size(obj)
    assert layout.plain_size(fixed + per) == 0


@pytest.mark.parametrize("version,fixed,per", LAYOUTS)
@pytest.mark.parametrize("bs", [SMALL, B])
def test_invalid_sizes_between_blocks(bs, version, fixed, per):
    # after k full blocks, a trailing piece of 1..per bytes holds no plaintext
    layout = fmt.Layout(bs, version)
    for k in (1, 2, 3):
        full = layout.object_size(k * bs)
        for extra in range(1, per + 1):
            with pytest.raises(FormatError):
                layout.plain_size(full + extra)
        assert layout.plain_size(full + per + 1) == k * bs + 1


@pytest.mark.parametrize("version", fmt.VERSIONS)
def test_size_mapping_is_a_bijection_small_block(version):
    layout = fmt.Layout(SMALL, version)
    limit = layout.object_size(3 * SMALL + 3)
    valid = {}
    for obj in range(limit + 1):
        try:
            n = layout.plain_size(obj)
        except FormatError:
            continue
        assert layout.object_size(n) == obj
        valid[obj] = n
    assert sorted(valid.values()) == list(range(3 * SMALL + 4))


def test_block_count_and_offset():
    assert fmt.block_count(0, B) == 1
    assert fmt.block_count(1, B) == 1
    assert fmt.block_count(B, B) == 1
    assert fmt.block_count(B + 1, B) == 2
    assert fmt.block_count(2 * B, B) == 2
    assert fmt.Layout(B).block_offset(0) == 56
    assert fmt.Layout(B).block_offset(1) == 56 + B + 28
    assert fmt.block_ct_size(B) == B + 28


@pytest.mark.parametrize("offset,length,expected", [
    (0, 0, []), (10, 0, []), (0, 1, [0]), (B - 1, 1, [0]), (B - 1, 2, [0, 1]), (B, 1, [1]),
    (0, B, [0]), (0, B + 1, [0, 1]), (1, B, [0, 1]), (5, 3 * B, [0, 1, 2, 3]),
    (2 * B, B, [2]), (2 * B + 1, 1, [2]),
])
def test_block_span(offset, length, expected):
    assert list(fmt.block_span(offset, length, B)) == expected


@pytest.mark.parametrize("size,lens", [
    (0, [0]), (1, [1]), (B - 1, [B - 1]), (B, [B]), (B + 1, [B, 1]), (2 * B, [B, B]),
    (2 * B + 1, [B, B, 1]),
])
def test_block_plain_len(size, lens):
    n = fmt.block_count(size, B)
    assert [fmt.block_plain_len(i, size, B) for i in range(n)] == lens
    assert sum(lens) == size
    with pytest.raises(ValueError):
        fmt.block_plain_len(n, size, B)


def test_log2_block_size():
    for exp in range(12, 25):
        assert fmt.log2_block_size(1 << exp) == exp
    for bad in (0, -4096, 1, 2048, 3000, 4095, 4097, 65535, 1 << 25, 3 << 12, "65536", 65536.0, None):
        with pytest.raises(FormatError):
            fmt.log2_block_size(bad)


# ---------------------------------------------------------------- keys of a file

def test_file_key_derivation_pinned():
    data_key, file_id = bytes(range(32)), bytes(range(100, 116))
    fk = fmt.FileKey.derive(data_key, file_id)
    assert fk.block_key == _hkdf(data_key, b"cryptfs v1 block key", salt=file_id)
    assert fk.commitment == _hkdf(data_key, b"cryptfs v1 key commitment", salt=file_id)
    assert fk.block_key != fk.commitment
    other = fmt.FileKey.derive(data_key, bytes(16))
    assert other.block_key != fk.block_key and other.commitment != fk.commitment


def test_file_key_bad_lengths():
    with pytest.raises(FormatError):
        fmt.FileKey.derive(bytes(31), bytes(16))
    with pytest.raises(FormatError):
        fmt.FileKey.derive(bytes(32), bytes(15))


def test_file_key_new_is_random():
    a, b = fmt.FileKey.new(), fmt.FileKey.new()
    assert a.data_key != b.data_key and a.file_id != b.file_id
    fid = os.urandom(16)
    assert fmt.FileKey.new(fid).file_id == fid


def test_volume_keys_pinned():
    secret = bytes(range(32))
    v = fmt.VolumeKeys.derive(secret)
    assert v.name_key == _hkdf(secret, b"cryptfs v1 name key", 64)
    assert v.dirhash_key == _hkdf(secret, b"cryptfs v1 directory hash key", 32)
    assert v.attr_key == _hkdf(secret, b"cryptfs v1 attribute key", 64)
    assert v.entry_key == _hkdf(secret, b"cryptfs v1 entry key", 64)
    assert len({v.name_key, v.attr_key, v.entry_key}) == 3


# ---------------------------------------------------------------- header

def test_header_layout():
    fk = fmt.FileKey.new()
    h = fmt.make_header(fk, fmt.Layout(B))
    assert len(h) == 56
    assert h[:4] == b"CRYF" and h[4] == 2 and h[5] == 16 and h[6:8] == b"\0\0"
    assert fmt.make_header(fk, fmt.Layout(B, 1))[4] == 1
    assert h[8:24] == fk.file_id and h[24:56] == fk.commitment
    parsed = fmt.parse_header(h + b"extra")
    assert parsed.raw == h and parsed.block_size == B
    assert parsed.file_id == fk.file_id and parsed.commitment == fk.commitment
    fmt.check_commitment(fk, parsed)
    assert fmt.make_header(fk, fmt.Layout(SMALL))[5] == 12


def test_header_refusals():
    h = fmt.make_header(fmt.FileKey.new(), fmt.Layout(B))
    with pytest.raises(FormatError):
        fmt.parse_header(h[:55])
    with pytest.raises(FormatError, match="magic"):
        fmt.parse_header(b"CRYX" + h[4:])
    for version in (0, 3, 255):
        with pytest.raises(FormatError, match="version"):
            fmt.parse_header(h[:4] + bytes([version]) + h[5:])
    with pytest.raises(FormatError, match="flags"):
        fmt.parse_header(h[:6] + b"\0\1" + h[8:])
    for exp in (0, 11, 25, 255):
        with pytest.raises(FormatError):
            fmt.parse_header(h[:5] + bytes([exp]) + h[6:])


def test_commitment_mismatch():
    fk = fmt.FileKey.new()
    header = fmt.parse_header(fmt.make_header(fk, fmt.Layout(B)))
    with pytest.raises(IntegrityError):
        fmt.check_commitment(fmt.FileKey.derive(os.urandom(32), fk.file_id), header)
    with pytest.raises(IntegrityError):
        fmt.check_commitment(fmt.FileKey.derive(fk.data_key, os.urandom(16)), header)


# ---------------------------------------------------------------- blocks and whole files

@pytest.mark.parametrize("bs", [SMALL, B])
@pytest.mark.parametrize("which", range(7))
def test_encrypt_decrypt_round_trip(bs, which):
    n = sizes_for(bs)[which]
    plain = os.urandom(n)
    fk = fmt.FileKey.new()
    body = fmt.encrypt_file(fk, plain, fmt.Layout(bs))
    assert len(body) == fmt.Layout(bs).object_size(n)
    assert fmt.decrypt_file(fk, body, fmt.Layout(bs)) == plain
    assert n < 16 or plain not in body


def test_encryptions_differ_by_nonce():
    fk = fmt.FileKey.new()
    a, b = fmt.encrypt_file(fk, b"same", fmt.Layout(SMALL)), fmt.encrypt_file(fk, b"same", fmt.Layout(SMALL))
    assert a[:56] == b[:56] and a != b


def test_decrypt_file_wrong_key_or_block_size():
    fk = fmt.FileKey.new()
    body = fmt.encrypt_file(fk, b"x" * 5000, fmt.Layout(SMALL))
    with pytest.raises(IntegrityError):
        fmt.decrypt_file(fmt.FileKey.new(fk.file_id), body, fmt.Layout(SMALL))
    with pytest.raises(FormatError):
        fmt.decrypt_file(fk, body, fmt.Layout(B))


def test_block_aad_binds_index_and_last_flag():
    fk = fmt.FileKey.new()
    header = fmt.make_header(fk, fmt.Layout(SMALL))
    nonce = bytes(12)
    block = fmt.encrypt_block(fk, header, 3, b"abc", True, nonce=nonce)
    assert block[:12] == nonce and len(block) == 3 + 28
    assert fmt.decrypt_block(fk, header, 3, block, True) == b"abc"
    with pytest.raises(IntegrityError):
        fmt.decrypt_block(fk, header, 2, block, True)
    with pytest.raises(IntegrityError):
        fmt.decrypt_block(fk, header, 3, block, False)
    other_header = fmt.make_header(fk, fmt.Layout(B))
    with pytest.raises(IntegrityError):
        fmt.decrypt_block(fk, other_header, 3, block, True)
    with pytest.raises(IntegrityError):
        fmt.decrypt_block(fk, header, 3, block[:27], True)


def test_block_construction_pinned():
    """A block is nonce || AES-256-GCM(block key, nonce, plain, header || u64be index || u8 last)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    fk = fmt.FileKey.derive(bytes(32), bytes(16))
    header = fmt.make_header(fk, fmt.Layout(SMALL))
    nonce = bytes(range(12))
    expected = nonce + AESGCM(fk.block_key).encrypt(
        nonce, b"hello", header + (7).to_bytes(8, "big") + b"\x01")
    assert fmt.encrypt_block(fk, header, 7, b"hello", True, nonce=nonce) == expected


# ---------------------------------------------------------------- names

name_bytes = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))


@settings(max_examples=300, deadline=None)
@given(name=name_bytes)
def test_name_round_trip_property(vk, name):
    dir_id = b"\x07" * 16
    enc = fmt.encrypt_name(vk, dir_id, name)
    assert KEY_CHARS.match(enc)
    assert all(len(part) <= 240 for part in enc.split("/"))
    assert fmt.decrypt_name(vk, dir_id, enc) == name
    assert fmt.encrypt_name(vk, dir_id, name) == enc  # deterministic: one key per name


@pytest.mark.parametrize("name", [
    b"a", b"\xff", b"\xff\xfe\x80", "caf\u00e9".encode("latin-1"), "\u00e9t\u00e9".encode(),
    b"...", b".hidden", b"x" * 15, b"x" * 16, b"\x80" * 255, b"\xff" * 255, bytes(range(1, 256)).replace(b"/", b""),
    b" ", b"A\x80", b"\x80",
])
def test_name_examples(vk, name):
    for dir_id in (fmt.ROOT_DIR_ID, b"\x42" * 16):
        enc = fmt.encrypt_name(vk, dir_id, name)
        assert KEY_CHARS.match(enc)
        assert fmt.decrypt_name(vk, dir_id, enc) == name
        full = fmt.dir_prefix(vk, dir_id) + enc
        assert KEY_CHARS.match(full)
        assert all(0 < len(c) <= 240 for c in full.split("/"))


def test_name_length_limits(vk):
    enc = fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"n" * 255)
    parts = enc.split("/")
    assert len(parts) == 2 and len(parts[0]) == 240 and len(parts[1]) <= 240
    with pytest.raises(NameTooLong):
        fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"n" * 256)
    with pytest.raises(NameTooLong):
        fmt.check_name(b"\xff" * 300)


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"/", b"a/b", b"a/", b"\0", b"a\0b"])
def test_name_refused(vk, bad):
    with pytest.raises(FormatError):
        fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, bad)


def test_name_padding_hides_exact_length(vk):
    lengths = {n: len(fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"q" * n)) for n in range(1, 49)}
    assert len({lengths[n] for n in range(1, 16)}) == 1
    assert len({lengths[n] for n in range(16, 32)}) == 1
    assert lengths[15] < lengths[16] < lengths[32]


def test_same_name_differs_between_directories(vk):
    a = fmt.encrypt_name(vk, b"\x01" * 16, b"report.txt")
    b = fmt.encrypt_name(vk, b"\x02" * 16, b"report.txt")
    assert a != b
    with pytest.raises(IntegrityError):
        fmt.decrypt_name(vk, b"\x02" * 16, a)
    other = fmt.VolumeKeys.derive(b"\x02" * 32)
    assert fmt.encrypt_name(other, b"\x01" * 16, b"report.txt") != a
    with pytest.raises(IntegrityError):
        fmt.decrypt_name(other, b"\x01" * 16, a)


def test_name_decoding_refusals(vk):
    enc = fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"some name")
    for bad in (".dir", "", "!!!!", enc + "a", enc.upper(), enc[:-1] + ("a" if enc[-1] != "a" else "b")):
        with pytest.raises((FormatError, IntegrityError)):
            fmt.decrypt_name(vk, fmt.ROOT_DIR_ID, bad)
    long = fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"L" * 255)
    first, rest = long.split("/")
    with pytest.raises(FormatError):  # split anywhere but at 240 characters
        fmt.decrypt_name(vk, fmt.ROOT_DIR_ID, first[:200] + "/" + first[200:] + rest)
    with pytest.raises(FormatError):  # not split at all
        fmt.decrypt_name(vk, fmt.ROOT_DIR_ID, first + rest)


def test_name_non_canonical_encoding_refused(vk):
    """Base32 with non-zero trailing bits decodes to the same bytes: such aliases are refused."""
    enc = fmt.encrypt_name(vk, fmt.ROOT_DIR_ID, b"x")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(enc[-1])
    variants = [enc[:-1] + alphabet[last ^ bit] for bit in (1, 2)]
    for v in variants:
        assert base64.b32decode(v.upper() + "=" * (-len(v) % 8)) == \
            base64.b32decode(enc.upper() + "=" * (-len(enc) % 8))
        with pytest.raises(FormatError):
            fmt.decrypt_name(vk, fmt.ROOT_DIR_ID, v)


def test_dir_prefix(vk):
    p = fmt.dir_prefix(vk, fmt.ROOT_DIR_ID)
    assert re.fullmatch(r"t/[a-z2-7]{32}/", p)
    assert p != fmt.dir_prefix(vk, b"\x01" * 16)
    assert p == fmt.dir_prefix(vk, fmt.ROOT_DIR_ID)
    import hmac
    digest = hmac.new(vk.dirhash_key, fmt.ROOT_DIR_ID, hashlib.sha256).digest()[:20]
    assert p == "t/" + base64.b32encode(digest).decode().lower() + "/"


# ---------------------------------------------------------------- directory entries and back-pointers

def test_dirent_round_trip_and_binding(vk):
    parent, child = os.urandom(16), fmt.new_dir_id()
    body = fmt.encrypt_dirent(vk, parent, b"docs", child)
    assert len(body) == fmt.DIRENT_SIZE == 56
    assert body[:4] == b"CRYD" and body[4] == 1 and body[5:8] == b"\0\0\0"
    assert fmt.decrypt_dirent(vk, parent, b"docs", body) == child
    assert fmt.encrypt_dirent(vk, parent, b"docs", child) != body  # fresh nonce
    with pytest.raises(IntegrityError):
        fmt.decrypt_dirent(vk, os.urandom(16), b"docs", body)
    with pytest.raises(IntegrityError):
        fmt.decrypt_dirent(vk, parent, b"docs2", body)
    with pytest.raises(IntegrityError):
        fmt.decrypt_dirent(fmt.VolumeKeys.derive(os.urandom(32)), parent, b"docs", body)


def test_dirent_refusals(vk):
    parent, child = os.urandom(16), os.urandom(16)
    body = fmt.encrypt_dirent(vk, parent, b"d", child)
    for bad in (body[:55], body + b"\0", b"CRYF" + body[4:], body[:4] + b"\2" + body[5:],
                body[:5] + b"\1\0\0" + body[8:], body[:7] + b"\1" + body[8:]):
        with pytest.raises(FormatError):
            fmt.decrypt_dirent(vk, parent, b"d", bad)


@pytest.mark.parametrize("name", [b"", b"a", b"\xff\xfe", b"z" * 255])
def test_backptr_round_trip_and_binding(vk, name):
    dir_id, parent = os.urandom(16), os.urandom(16)
    body = fmt.encrypt_backptr(vk, dir_id, parent, name)
    assert body[:4] == b"CRYB" and body[4] == 1 and body[5:8] == b"\0\0\0"
    assert len(body) == 24 + 16 + 16 + len(name)
    assert fmt.decrypt_backptr(vk, dir_id, body) == (parent, name)
    with pytest.raises(IntegrityError):
        fmt.decrypt_backptr(vk, os.urandom(16), body)
    flipped = bytearray(body)
    flipped[-1] ^= 1
    with pytest.raises(IntegrityError):
        fmt.decrypt_backptr(vk, dir_id, bytes(flipped))
    for bad in (body[:55], b"CRYD" + body[4:], body[:4] + b"\0" + body[5:], body[:6] + b"\1" + body[7:]):
        with pytest.raises(FormatError):
            fmt.decrypt_backptr(vk, dir_id, bad)


def test_root_backptr(vk):
    body = fmt.encrypt_backptr(vk, fmt.ROOT_DIR_ID, fmt.ROOT_DIR_ID, b"")
    assert fmt.decrypt_backptr(vk, fmt.ROOT_DIR_ID, body) == (fmt.ROOT_DIR_ID, b"")


# ---------------------------------------------------------------- attributes

ATTRS = fmt.Attrs(stat.S_IFREG | 0o640, 1000, 100, 1_700_000_000_123_456_789, 1_700_000_001_000_000_000)


@pytest.mark.parametrize("attrs", [
    ATTRS,
    fmt.Attrs(stat.S_IFDIR | 0o755, 0, 0, 0, 0),
    fmt.Attrs(stat.S_IFLNK | 0o777, 2 ** 32 - 1, 2 ** 32 - 1, -1, -(2 ** 63)),
    fmt.Attrs(stat.S_IFREG | 0o7777, 65534, 65534, 2 ** 63 - 1, 2 ** 63 - 1),
    fmt.Attrs(stat.S_IFREG | 0o600, 1, 2, 1_950_000_000_200_000_000, 5, atime_ns=1_900_000_000_100_000_000),
    fmt.Attrs(stat.S_IFCHR | 0o600, 0, 0, 1, 2, atime_ns=-(2 ** 63), rdev=2 ** 64 - 1),
])
def test_attrs_round_trip(vk, attrs):
    blob = fmt.encrypt_attrs(vk, "t/abc/def", b"\x05" * 16, attrs)
    assert len(blob) == 16 + 16 + 45
    assert fmt.decrypt_attrs(vk, "t/abc/def", b"\x05" * 16, blob) == attrs


def test_attrs_version_1_still_read(vk):
    """Blobs written before atime and rdev were stored: atime reads as mtime, rdev as 0."""
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV
    nonce = bytes(16)
    plain = struct.pack(">BIIIqq", 1, stat.S_IFREG | 0o644, 7, 8, 1000, 2000)
    blob = nonce + AESSIV(vk.attr_key).encrypt(plain, [b"cryptfs v1 attrs", b"t/k", b"\x01" * 16, nonce])
    assert len(blob) == 61
    assert fmt.decrypt_attrs(vk, "t/k", b"\x01" * 16, blob) == fmt.Attrs(stat.S_IFREG | 0o644, 7, 8, 1000, 2000,
                                                                          atime_ns=1000, rdev=0)


def test_attrs_version_3_carries_the_link_count(vk):
    """Written only for a hard-linked file whose count is not 1; versions 1 and 2 mean 1."""
    linked = fmt.Attrs(stat.S_IFREG | 0o644, 7, 8, 1000, 2000, 3000, 0, nlink=3)
    blob = fmt.encrypt_attrs(vk, "i/abc", b"\x02" * 16, linked)
    assert len(blob) == 81
    assert fmt.decrypt_attrs(vk, "i/abc", b"\x02" * 16, blob) == linked
    assert len(fmt.encrypt_attrs(vk, "i/abc", b"\x02" * 16, replace(linked, nlink=1))) == 77
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV
    nonce = bytes(16)
    wrong = struct.pack(">BIIIqqqQI", 2, stat.S_IFREG, 0, 0, 1, 2, 3, 0, 2)  # version byte of another length
    blob = nonce + AESSIV(vk.attr_key).encrypt(wrong, [b"cryptfs v1 attrs", b"i/k", b"\x01" * 16, nonce])
    with pytest.raises(FormatError):
        fmt.decrypt_attrs(vk, "i/k", b"\x01" * 16, blob)


def test_link_entry_round_trip_and_binding(vk):
    parent, fid = os.urandom(16), os.urandom(16)
    body = fmt.encrypt_link(vk, parent, b"name", fid)
    assert len(body) == fmt.LINK_SIZE == 64 and body[:8] == b"CRYK\x01\0\0\0"
    assert fmt.decrypt_link(vk, parent, b"name", body) == fid
    with pytest.raises(IntegrityError):
        fmt.decrypt_link(vk, parent, b"other", body)       # moved to another name
    with pytest.raises(IntegrityError):
        fmt.decrypt_link(vk, os.urandom(16), b"name", body)  # or directory
    for i in range(24, 64):
        flipped = bytearray(body)
        flipped[i] ^= 1
        with pytest.raises(IntegrityError):
            fmt.decrypt_link(vk, parent, b"name", bytes(flipped))
    for bad in (body[:-1], b"CRYD" + body[4:], body[:4] + b"\x02" + body[5:], body[:5] + b"\1" + body[6:]):
        with pytest.raises(FormatError):
            fmt.decrypt_link(vk, parent, b"name", bad)
    key = fmt.inode_key(vk, fid)
    assert key.startswith("i/") and len(key) == 34 and key == fmt.inode_key(vk, fid) != fmt.inode_key(vk, parent)
    layout = fmt.Layout(fmt.DEFAULT_BLOCK_SIZE)
    with pytest.raises(FormatError):  # a listing never mistakes a link entry for a file object
        layout.plain_size(fmt.LINK_SIZE)


def test_attrs_binding(vk):
    oid = os.urandom(16)
    blob = fmt.encrypt_attrs(vk, "t/aaaa/bbbb", oid, ATTRS)
    assert fmt.encrypt_attrs(vk, "t/aaaa/bbbb", oid, ATTRS) != blob  # fresh nonce
    with pytest.raises(IntegrityError):
        fmt.decrypt_attrs(vk, "t/aaaa/cccc", oid, blob)
    with pytest.raises(IntegrityError):
        fmt.decrypt_attrs(vk, "t/aaaa/bbbb", os.urandom(16), blob)
    with pytest.raises(IntegrityError):
        fmt.decrypt_attrs(fmt.VolumeKeys.derive(os.urandom(32)), "t/aaaa/bbbb", oid, blob)
    with pytest.raises(IntegrityError):
        fmt.decrypt_attrs(vk, "t/aaaa/bbbb", oid, blob[:-1])
    with pytest.raises(IntegrityError):
        fmt.decrypt_attrs(vk, "t/aaaa/bbbb", oid, blob + b"\0")
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(IntegrityError):
            fmt.decrypt_attrs(vk, "t/aaaa/bbbb", oid, bytes(bad))


# ---------------------------------------------------------------- user metadata

def test_metadata_fits_s3_limit_with_rsa4096(vk):
    big = keys.generate_rsa(4096)
    fk = fmt.FileKey.new()
    wrapped = keys.wrap(big.public_key(), fk.data_key, keys.DATA_KEY_LABEL)
    assert len(wrapped) == 512
    key = "t/" + "a" * 32 + "/" + fmt.encrypt_name(vk, b"\x03" * 16, b"n" * 255)
    meta = fmt.file_metadata(vk, key, fk.file_id, wrapped, ATTRS)
    assert set(meta) == {"cf-v", "cf-id", "cf-key", "cf-attr"}
    assert all(k == k.lower() for k in meta)
    assert all(v.isascii() for v in meta.values())
    total = sum(len(k) + len(v) for k, v in meta.items())
    assert total < 2048
    parsed = fmt.parse_metadata(meta)
    assert parsed.obj_id == fk.file_id and parsed.wrapped_key == wrapped
    assert fmt.decrypt_attrs(vk, key, fk.file_id, parsed.attr_blob) == ATTRS
    assert keys.unwrap(big, parsed.wrapped_key, keys.DATA_KEY_LABEL) == fk.data_key


def test_dirent_metadata(vk):
    did = os.urandom(16)
    meta = fmt.dirent_metadata(vk, "t/x/y", did, fmt.Attrs(stat.S_IFDIR | 0o700, 1, 2, 3, 4))
    assert set(meta) == {"cf-v", "cf-id", "cf-attr"}
    parsed = fmt.parse_metadata(meta)
    assert parsed.wrapped_key is None and parsed.obj_id == did


def test_parse_metadata_refusals(vk):
    good = fmt.file_metadata(vk, "t/x/y", b"\x01" * 16, b"\x02" * 256, ATTRS)
    bad_cases = [
        {},
        {k: v for k, v in good.items() if k != "cf-v"},
        {**good, "cf-v": "2"},
        {**good, "cf-v": "0"},
        {k: v for k, v in good.items() if k != "cf-id"},
        {k: v for k, v in good.items() if k != "cf-attr"},
        {**good, "cf-id": "not base64!"},
        {**good, "cf-id": fmt.b64e(b"\x01" * 15)},
        {**good, "cf-key": "%%%"},
    ]
    for meta in bad_cases:
        with pytest.raises(FormatError):
            fmt.parse_metadata(meta)


# ---------------------------------------------------------------- RSA, wrapping, signatures

def test_rsa_minimum():
    with pytest.raises(ValueError):
        keys.generate_rsa(1024)
    from cryptography.hazmat.primitives.asymmetric import rsa
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(FormatError):
        keys.load_public_pem(keys.public_pem(small))
    with pytest.raises(FormatError):
        keys.load_public_pem("not a key")


def test_fingerprint_and_pem(rsa2048):
    fp = keys.fingerprint(rsa2048)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert fp == keys.fingerprint(rsa2048.public_key())
    pub = keys.load_public_pem(keys.public_pem(rsa2048))
    assert keys.fingerprint(pub) == fp


def test_wrap_unwrap(rsa2048):
    secret = os.urandom(32)
    wrapped = keys.wrap(rsa2048.public_key(), secret, keys.DATA_KEY_LABEL)
    assert len(wrapped) == 256
    assert keys.unwrap(rsa2048, wrapped, keys.DATA_KEY_LABEL) == secret
    with pytest.raises(IntegrityError):
        keys.unwrap(rsa2048, wrapped, keys.SECRET_LABEL)  # labels separate purposes
    with pytest.raises(IntegrityError):
        keys.unwrap(keys.generate_rsa(2048), wrapped, keys.DATA_KEY_LABEL)
    bad = bytearray(wrapped)
    bad[100] ^= 1
    with pytest.raises(IntegrityError):
        keys.unwrap(rsa2048, bytes(bad), keys.DATA_KEY_LABEL)


def test_wrap_private_key(rsa2048):
    content = keys.generate_rsa(2048)
    blob = keys.wrap_private_key(rsa2048.public_key(), content)
    assert set(blob) == {"wrapped_key", "nonce", "ciphertext"}
    assert keys.fingerprint(keys.unwrap_private_key(rsa2048, blob)) == keys.fingerprint(content)
    ct = bytearray(bytes.fromhex(blob["ciphertext"]))
    ct[10] ^= 1
    with pytest.raises(IntegrityError):
        keys.unwrap_private_key(rsa2048, {**blob, "ciphertext": ct.hex()})
    with pytest.raises(IntegrityError):
        keys.unwrap_private_key(content, blob)


def test_sign_verify(rsa2048):
    data = keys.canonical_json({"b": 1, "a": [1, 2]})
    assert data == b'{"a":[1,2],"b":1}'
    sig = keys.sign(rsa2048, data)
    assert keys.verify(rsa2048.public_key(), data, sig)
    assert not keys.verify(rsa2048.public_key(), data + b" ", sig)
    assert not keys.verify(keys.generate_rsa(2048).public_key(), data, sig)


def test_data_key_cache(rsa2048):
    dk = os.urandom(32)
    wrapped = keys.wrap(rsa2048.public_key(), dk, keys.DATA_KEY_LABEL)
    cache = keys.DataKeyCache(rsa2048)
    assert cache.unwrap(wrapped) == dk
    assert cache.unwrap(wrapped) == dk
    short = keys.wrap(rsa2048.public_key(), b"short", keys.DATA_KEY_LABEL)
    with pytest.raises(IntegrityError):
        cache.unwrap(short)
    writer = keys.DataKeyCache(None)
    with pytest.raises(ReadOnly):
        writer.unwrap(wrapped)
    writer.remember(wrapped, dk)
    assert writer.unwrap(wrapped) == dk


# ---------------------------------------------------------------- passphrase protection

@pytest.fixture(scope="module")
def protected(rsa2048):
    return keys.protect_private_key(rsa2048, b"correct horse")


def test_protect_unlock(rsa2048, protected):
    assert protected["kdf"] == "scrypt" and protected["n"] == 2 ** 17 and protected["r"] == 8
    assert protected["p"] == 1 and protected["fingerprint"] == keys.fingerprint(rsa2048)
    assert len(bytes.fromhex(protected["salt"])) == 16 and len(bytes.fromhex(protected["nonce"])) == 12
    key = keys.unlock_private_key(protected, b"correct horse")
    assert keys.fingerprint(key) == keys.fingerprint(rsa2048)


def test_wrong_passphrase(protected):
    with pytest.raises(WrongPassphrase):
        keys.unlock_private_key(protected, b"correct horsE")


def test_bound_parameters(protected):
    """Parameters are associated data: changing the salt (or anything bound) fails like a wrong passphrase."""
    salt = bytearray(bytes.fromhex(protected["salt"]))
    salt[0] ^= 1
    with pytest.raises(WrongPassphrase):
        keys.unlock_private_key({**protected, "salt": salt.hex()}, b"correct horse")


@pytest.mark.parametrize("change", [
    {"n": 2 ** 16}, {"n": 2 ** 14}, {"r": 7}, {"r": 1}, {"p": 0}, {"kdf": "pbkdf2"},
])
def test_weak_scrypt_parameters_refused(rsa2048, protected, change):
    with pytest.raises(FormatError):
        keys.unlock_private_key({**protected, **change}, b"correct horse")
    if "kdf" not in change:
        params = {"n": change.get("n", 2 ** 17), "r": change.get("r", 8), "p": change.get("p", 1)}
        with pytest.raises(FormatError):
            keys.protect_private_key(rsa2048, b"pw", **params)


# ---------------------------------------------------------------- property tests: block-level updates

BS = SMALL
MAX_OFFSET = 5 * BS


def _block_update(fk, header, body, size, new_size, patches):
    """Re-encrypt only what an update must touch: the patched blocks, the old and new last
    blocks, and blocks beyond the old end; every other block's ciphertext is kept as is."""
    old_n = fmt.block_count(size, BS)
    new_n = fmt.block_count(new_size, BS)
    dirty = set(range(old_n, new_n))
    for off, data in patches:
        dirty |= set(fmt.block_span(off, len(data), BS))
    if new_size != size:
        dirty |= {old_n - 1, new_n - 1}
    parts = [header]
    for i in range(new_n):
        start = fmt.Layout(BS).block_offset(i)
        if i not in dirty:
            end = start + fmt.block_plain_len(i, size, BS) + fmt.BLOCK_OVERHEAD
            parts.append(body[start:end])
            continue
        if i < old_n:
            end = start + fmt.block_plain_len(i, size, BS) + fmt.BLOCK_OVERHEAD
            plain = bytearray(fmt.decrypt_block(fk, header, i, body[start:end], i == old_n - 1))
        else:
            plain = bytearray()
        want = fmt.block_plain_len(i, new_size, BS)
        plain = plain[:want] + bytes(max(0, want - len(plain)))
        base = i * BS
        for off, data in patches:
            lo, hi = max(off, base), min(off + len(data), base + want)
            if lo < hi:
                plain[lo - base:hi - base] = data[lo - off:hi - off]
        parts.append(fmt.encrypt_block(fk, header, i, bytes(plain), i == new_n - 1))
    return b"".join(parts) + fmt.make_table(fk, header, b"".join(map(fmt.block_tag, parts[1:])))


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, MAX_OFFSET), st.binary(min_size=1, max_size=2 * BS + 10)),
    st.tuples(st.just("truncate"), st.integers(0, MAX_OFFSET + BS), st.just(b"")),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=BS + 10)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.binary(max_size=2 * BS + 5), ops=st.lists(op, max_size=12))
def test_model_random_writes_truncates_appends(initial, ops):
    fk = fmt.FileKey.new()
    header = fmt.make_header(fk, fmt.Layout(BS))
    model = bytearray(initial)
    whole = fmt.encrypt_file(fk, bytes(model), fmt.Layout(BS))
    body = whole
    for kind, off, data in ops:
        size = len(model)
        if kind == "write":
            if off > size:
                model += bytes(off - size)
            model[off:off + len(data)] = data
            patches = [(off, data)]
        elif kind == "append":
            patches = [(size, data)]
            model += data
        else:
            if off < size:
                del model[off:]
            else:
                model += bytes(off - size)
            patches = []
        new_size = len(model)
        new_body = _block_update(fk, header, body, size, new_size, patches)
        # blocks the update did not touch are carried over byte for byte
        untouched = set(range(min(fmt.block_count(size, BS), fmt.block_count(new_size, BS)) - 1))
        for off2, data2 in patches:
            untouched -= set(fmt.block_span(off2, len(data2), BS))
        for i in untouched:
            s = fmt.Layout(BS).block_offset(i)
            assert new_body[s:s + BS + 28] == body[s:s + BS + 28]
        body = new_body
        whole = fmt.encrypt_file(fk, bytes(model), fmt.Layout(BS))
        assert len(body) == len(whole) == fmt.Layout(BS).object_size(len(model))
        assert fmt.Layout(BS).plain_size(len(body)) == len(model)
        assert fmt.decrypt_file(fk, body, fmt.Layout(BS)) == bytes(model)
        assert fmt.decrypt_file(fk, whole, fmt.Layout(BS)) == bytes(model)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 4 * BS + 3), offset=st.integers(0, 5 * BS), length=st.integers(0, 2 * BS))
def test_block_span_property(size, offset, length):
    span = fmt.block_span(offset, length, BS)
    touched = {b // BS for b in range(offset, offset + length)}
    assert set(span) == touched
    n = fmt.block_count(size, BS)
    assert sum(fmt.block_plain_len(i, size, BS) for i in range(n)) == size
    assert fmt.Layout(BS).plain_size(fmt.Layout(BS).object_size(size)) == size
