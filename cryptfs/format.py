"""The in-bucket format, pure: headers, blocks, sizes, names, entries, attributes.

Bytes in, bytes out; no I/O, no clocks except the random source for nonces and ids.
docs/format.md is the specification this module implements; tests/vectors pins it.
"""

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import FormatError, IntegrityError, NameTooLong

VERSION = 2                 # what new volumes are written in
VERSIONS = (1, 2)           # what this module reads
ENTRY_VERSION = 1           # directory entries, back-pointers and metadata: unchanged in version 2
FILE_MAGIC = b"CRYF"
DIRENT_MAGIC = b"CRYD"
BACKPTR_MAGIC = b"CRYB"
LINK_MAGIC = b"CRYK"

DEFAULT_BLOCK_SIZE = 64 * 1024
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
FILE_ID_SIZE = 16
DIR_ID_SIZE = 16
COMMIT_SIZE = 32
TABLE_MAC_SIZE = 32  # version 2: HMAC-SHA256 over the tag table
HEADER_SIZE = 4 + 1 + 1 + 2 + FILE_ID_SIZE + COMMIT_SIZE  # 56
DIRENT_SIZE = 4 + 1 + 3 + 16 + 16 + DIR_ID_SIZE  # 56: never a valid file object size
LINK_SIZE = 4 + 1 + 3 + 16 + 16 + FILE_ID_SIZE + 8  # 64: a hard-linked name; nor is this
NAME_MAX = 255
NAME_COMPONENT_MAX = 240  # encoded key components stay below every backend's 255
ROOT_DIR_ID = bytes(DIR_ID_SIZE)
BACKPTR_NAME = ".dir"  # not base32, so it never collides with an encrypted name

# user-metadata keys (S3 lower-cases them; values must be ASCII)
META_VERSION = "cf-v"
META_ID = "cf-id"
META_KEY = "cf-key"
META_ATTR = "cf-attr"


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeError, AttributeError) as exc:
        raise FormatError(f"bad base64 field: {exc}") from None


def hkdf(secret: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


# ---------------------------------------------------------------- sizes and offsets

def block_ct_size(block_size: int) -> int:
    return block_size + BLOCK_OVERHEAD


def block_count(plain_size: int, block_size: int) -> int:
    """Blocks an object of this plaintext size has: an empty file still has one."""
    return max(1, -(-plain_size // block_size))


@dataclass(frozen=True)
class Layout:
    """Where the bytes of a file object go, for one block size and format version.

    Version 1: header, blocks. Version 2: header, blocks, then the tag table (every
    block's GCM tag, in order, and a MAC over them), which binds each block to the version
    of the file it was written for.
    """
    block_size: int
    version: int = VERSION

    def __post_init__(self):
        log2_block_size(self.block_size)
        if self.version not in VERSIONS:
            raise FormatError(f"unsupported file format version {self.version}")

    @property
    def has_table(self) -> bool:
        return self.version >= 2

    @property
    def _per_block(self) -> int:
        """Object bytes per block beyond its plaintext."""
        return BLOCK_OVERHEAD + (TAG_SIZE if self.has_table else 0)

    @property
    def _fixed(self) -> int:
        return HEADER_SIZE + (TABLE_MAC_SIZE if self.has_table else 0)

    def object_size(self, plain_size: int) -> int:
        if plain_size < 0:
            raise ValueError("negative size")
        return self._fixed + plain_size + self._per_block * block_count(plain_size, self.block_size)

    def largest_plain(self, obj_limit: int) -> int:
        """The largest plaintext size whose object fits in `obj_limit` bytes."""
        full, rest = divmod(obj_limit - self._fixed, self.block_size + self._per_block)
        return full * self.block_size + max(0, rest - self._per_block)

    def plain_size(self, obj_size: int) -> int:
        """Plaintext size for an object size; FormatError when no plaintext size maps to it."""
        body, per = obj_size - self._fixed, self._per_block
        if body < per:
            raise FormatError(f"object of {obj_size} bytes is too short for a cryptfs file")
        full, rest = divmod(body, self.block_size + per)
        if rest == 0:
            return full * self.block_size
        if rest == per and full == 0:
            return 0
        if rest <= per:
            raise FormatError(f"object size {obj_size} maps to no plaintext size")
        return full * self.block_size + rest - per

    def block_offset(self, index: int) -> int:
        """Object offset where ciphertext block `index` starts."""
        return HEADER_SIZE + index * block_ct_size(self.block_size)

    def blocks_extent(self, first: int, end: int, size: int) -> tuple[int, int]:
        """Object byte range [start, stop) holding blocks [first, end) of a file of `size` bytes."""
        last = end - 1
        return (self.block_offset(first),
                self.block_offset(last) + BLOCK_OVERHEAD + block_plain_len(last, size, self.block_size))

    def split_blocks(self, data: bytes, first: int, end: int, size: int) -> list[bytes]:
        """Blocks [first, end) out of the object bytes that hold them, laid out as in the object."""
        base = self.block_offset(first)
        return [data[lo - base:hi - base] for lo, hi in (self.blocks_extent(i, i + 1, size) for i in range(first, end))]

    def table_extent(self, size: int) -> tuple[int, int]:
        """Object byte range of the tag table (version 2) of a file of `size` bytes."""
        n = block_count(size, self.block_size)
        start = self.blocks_extent(n - 1, n, size)[1]
        return start, start + TAG_SIZE * n + TABLE_MAC_SIZE


def block_span(offset: int, length: int, block_size: int) -> range:
    """Indexes of the blocks that plaintext bytes [offset, offset+length) touch."""
    if length <= 0:
        return range(offset // block_size, offset // block_size)
    return range(offset // block_size, (offset + length - 1) // block_size + 1)


def block_plain_len(index: int, size: int, block_size: int) -> int:
    """Plaintext length of block `index` in a file of `size` bytes."""
    last = block_count(size, block_size) - 1
    if index < last:
        return block_size
    if index == last:
        return size - last * block_size
    raise ValueError("block beyond end of file")


# ---------------------------------------------------------------- file header and blocks

@dataclass(frozen=True)
class FileKey:
    """A file's data key with what derives from it; build with FileKey.derive."""
    data_key: bytes
    file_id: bytes
    block_key: bytes
    commitment: bytes
    table_key: bytes  # version 2: MAC key of the tag table

    @classmethod
    def derive(cls, data_key: bytes, file_id: bytes) -> "FileKey":
        if len(data_key) != 32 or len(file_id) != FILE_ID_SIZE:
            raise FormatError("bad data key or file id length")
        return cls(data_key, file_id,
                   hkdf(data_key, b"cryptfs v1 block key", salt=file_id),
                   hkdf(data_key, b"cryptfs v1 key commitment", salt=file_id),
                   hkdf(data_key, b"cryptfs v2 tag table key", salt=file_id))

    @classmethod
    def new(cls, file_id: bytes | None = None) -> "FileKey":
        return cls.derive(os.urandom(32), file_id or os.urandom(FILE_ID_SIZE))


def log2_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size <= 0:
        raise FormatError(f"block size {block_size!r} is not a power of two in 4 KiB..16 MiB")
    exp = block_size.bit_length() - 1
    if block_size != 1 << exp or not 12 <= exp <= 24:
        raise FormatError(f"block size {block_size} is not a power of two in 4 KiB..16 MiB")
    return exp


def make_header(fk: FileKey, layout: Layout) -> bytes:
    return (FILE_MAGIC + bytes([layout.version, log2_block_size(layout.block_size)]) + b"\0\0"
            + fk.file_id + fk.commitment)


@dataclass(frozen=True)
class Header:
    raw: bytes
    block_size: int
    file_id: bytes
    commitment: bytes
    version: int


def parse_header(raw: bytes) -> Header:
    if len(raw) < HEADER_SIZE:
        raise FormatError("object shorter than a cryptfs header")
    raw = bytes(raw[:HEADER_SIZE])
    if raw[:4] != FILE_MAGIC:
        raise FormatError("not a cryptfs file object (bad magic)")
    if raw[4] not in VERSIONS:
        raise FormatError(f"unsupported file format version {raw[4]}")
    if raw[6:8] != b"\0\0":
        raise FormatError("unknown header flags")
    exp = raw[5]
    if not 12 <= exp <= 24:
        raise FormatError(f"bad block size exponent {exp}")
    return Header(raw, 1 << exp, raw[8:24], raw[24:56], raw[4])


def check_header(fk: FileKey, raw: bytes, layout: Layout) -> Header:
    """The stored header of a file object, checked against its key and the volume's layout."""
    header = parse_header(raw)
    if header.block_size != layout.block_size:
        raise FormatError("file block size differs from the volume's")
    if header.version != layout.version:
        raise FormatError(f"file format version {header.version} in a version {layout.version} volume")
    check_commitment(fk, header)
    return header


def check_commitment(fk: FileKey, header: Header) -> None:
    if fk.file_id != header.file_id or not hmac.compare_digest(fk.commitment, header.commitment):
        raise IntegrityError("data key does not match the file header (key commitment)")


def _block_aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if last else 0)


def encrypt_block(fk: FileKey, header: bytes, index: int, plain: bytes | bytearray, last: bool,
                  nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(NONCE_SIZE)
    return nonce + AESGCM(fk.block_key).encrypt(nonce, bytes(plain), _block_aad(header, index, last))


def decrypt_block(fk: FileKey, header: bytes, index: int, block: bytes, last: bool) -> bytes:
    if len(block) < BLOCK_OVERHEAD:
        raise IntegrityError(f"block {index} is truncated")
    try:
        return AESGCM(fk.block_key).decrypt(block[:NONCE_SIZE], bytes(block[NONCE_SIZE:]),
                                            _block_aad(header, index, last))
    except InvalidTag:
        raise IntegrityError(f"block {index} failed authentication") from None


def block_tag(block: bytes) -> bytes:
    """The GCM tag of an encrypted block: what the tag table lists for it."""
    return bytes(block[-TAG_SIZE:])


def _table_mac(fk: FileKey, header: bytes, tags: bytes) -> bytes:
    return hmac.new(fk.table_key, b"cryptfs v2 tag table" + header + struct.pack(">Q", len(tags) // TAG_SIZE)
                    + tags, hashlib.sha256).digest()


def make_table(fk: FileKey, header: bytes, tags: bytes) -> bytes:
    """The tag table that ends a version 2 object: the blocks' tags in order, then their MAC."""
    return tags + _table_mac(fk, header, tags)


def open_table(fk: FileKey, header: bytes, raw: bytes, nblocks: int) -> bytes:
    """The blocks' tags from a stored tag table, after checking its length and MAC."""
    tags, mac = raw[:-TABLE_MAC_SIZE], raw[-TABLE_MAC_SIZE:]
    if len(raw) != TAG_SIZE * nblocks + TABLE_MAC_SIZE:
        raise IntegrityError("tag table has the wrong length for the object's size")
    if not hmac.compare_digest(mac, _table_mac(fk, header, bytes(tags))):
        raise IntegrityError("tag table failed authentication")
    return bytes(tags)


def check_tag(tags: bytes, index: int, block: bytes) -> None:
    """A block must be the one this version of the file lists, not one of another version."""
    if not hmac.compare_digest(tags[index * TAG_SIZE:(index + 1) * TAG_SIZE], block_tag(block)):
        raise IntegrityError(f"block {index} belongs to another version of the file")


def encrypt_file(fk: FileKey, plain: bytes, layout: Layout) -> bytes:
    """A whole object body for small contents (tests, symlinks, vectors)."""
    header = make_header(fk, layout)
    bs = layout.block_size
    n = block_count(len(plain), bs)
    blocks = [encrypt_block(fk, header, i, plain[i * bs:(i + 1) * bs], i == n - 1) for i in range(n)]
    table = make_table(fk, header, b"".join(map(block_tag, blocks))) if layout.has_table else b""
    return header + b"".join(blocks) + table


def decrypt_file(fk: FileKey, body: bytes, layout: Layout) -> bytes:
    """Decrypt a whole object body, checking every block, the tag table and the exact end."""
    header = check_header(fk, body, layout).raw
    size = layout.plain_size(len(body))
    n = block_count(size, layout.block_size)
    tags = open_table(fk, header, body[slice(*layout.table_extent(size))], n) if layout.has_table else None
    out = []
    for i in range(n):
        block = body[slice(*layout.blocks_extent(i, i + 1, size))]
        if tags is not None:
            check_tag(tags, i, block)
        out.append(decrypt_block(fk, header, i, block, i == n - 1))
    return b"".join(out)


# ---------------------------------------------------------------- volume-secret subkeys

@dataclass(frozen=True)
class VolumeKeys:
    """Keys derived from the volume secret, one purpose each."""
    name_key: bytes      # AES-SIV-256 for entry names
    dirhash_key: bytes   # HMAC for directory prefixes
    attr_key: bytes      # AES-SIV-256 for attribute blobs
    entry_key: bytes     # AES-SIV-256 for directory entries and back-pointers

    @classmethod
    def derive(cls, secret: bytes) -> "VolumeKeys":
        return cls(hkdf(secret, b"cryptfs v1 name key", 64),
                   hkdf(secret, b"cryptfs v1 directory hash key", 32),
                   hkdf(secret, b"cryptfs v1 attribute key", 64),
                   hkdf(secret, b"cryptfs v1 entry key", 64))


# ---------------------------------------------------------------- names and layout

def _b32e(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32d(text: str) -> bytes:
    pad = "=" * (-len(text) % 8)
    try:
        return base64.b32decode(text.upper() + pad)
    except ValueError:
        raise FormatError("not an encrypted name") from None


def dir_prefix(vk: VolumeKeys, dir_id: bytes) -> str:
    """Key prefix (relative to the volume) holding a directory's entries."""
    digest = hmac.new(vk.dirhash_key, dir_id, hashlib.sha256).digest()[:20]
    return f"t/{_b32e(digest)}/"


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FormatError(f"invalid entry name {name!r}")
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name is {len(name)} bytes, longer than {NAME_MAX}")


def encrypt_name(vk: VolumeKeys, dir_id: bytes, name: bytes) -> str:
    """Entry key suffix for `name` in directory `dir_id`: deterministic, padded, split."""
    check_name(name)
    padded = name + b"\x80" + bytes(-(len(name) + 1) % 16)
    return _split_name(_b32e(AESSIV(vk.name_key).encrypt(padded, [b"cryptfs v1 name", dir_id])))


def _split_name(enc: str) -> str:
    return "/".join(enc[i:i + NAME_COMPONENT_MAX] for i in range(0, len(enc), NAME_COMPONENT_MAX))


def decrypt_name(vk: VolumeKeys, dir_id: bytes, suffix: str) -> bytes:
    raw = _b32d(suffix.replace("/", ""))
    # exactly one key per name: no other split, letter case or trailing bits
    if _split_name(_b32e(raw)) != suffix:
        raise FormatError("not an encrypted name (non-canonical encoding)")
    try:
        padded = AESSIV(vk.name_key).decrypt(raw, [b"cryptfs v1 name", dir_id])
    except (InvalidTag, ValueError):
        raise IntegrityError("entry name failed authentication") from None
    name, marker, zeros = padded.rpartition(b"\x80")
    if not marker or zeros.strip(b"\0"):
        raise IntegrityError("bad name padding")
    return name


def new_dir_id() -> bytes:
    return os.urandom(DIR_ID_SIZE)


def encrypt_dirent(vk: VolumeKeys, parent_id: bytes, name: bytes, child_id: bytes) -> bytes:
    """The object body of a directory entry: the child's id bound to (parent, name)."""
    nonce = os.urandom(16)
    sealed = AESSIV(vk.entry_key).encrypt(child_id, [b"cryptfs v1 dirent", parent_id, name, nonce])
    return DIRENT_MAGIC + bytes([ENTRY_VERSION]) + b"\0\0\0" + nonce + sealed


def decrypt_dirent(vk: VolumeKeys, parent_id: bytes, name: bytes, body: bytes) -> bytes:
    if len(body) != DIRENT_SIZE or body[:4] != DIRENT_MAGIC:
        raise FormatError("not a cryptfs directory entry")
    if body[4] != ENTRY_VERSION:
        raise FormatError(f"unsupported directory entry version {body[4]}")
    if body[5:8] != b"\0\0\0":
        raise FormatError("unknown directory entry flags")
    nonce = body[8:24]
    try:
        return AESSIV(vk.entry_key).decrypt(body[24:], [b"cryptfs v1 dirent", parent_id, name, nonce])
    except InvalidTag:
        raise IntegrityError("directory entry failed authentication") from None


def inode_key(vk: VolumeKeys, file_id: bytes) -> str:
    """Key (relative to the volume) of a hard-linked file's object, which its names point to."""
    digest = hmac.new(vk.dirhash_key, b"cryptfs v1 inode" + file_id, hashlib.sha256).digest()[:20]
    return f"i/{_b32e(digest)}"


def encrypt_link(vk: VolumeKeys, parent_id: bytes, name: bytes, file_id: bytes) -> bytes:
    """The object body of a hard-linked name: the file's id bound to (parent, name)."""
    nonce = os.urandom(16)
    sealed = AESSIV(vk.entry_key).encrypt(file_id + bytes(8), [b"cryptfs v1 link", parent_id, name, nonce])
    return LINK_MAGIC + bytes([ENTRY_VERSION]) + b"\0\0\0" + nonce + sealed


def decrypt_link(vk: VolumeKeys, parent_id: bytes, name: bytes, body: bytes) -> bytes:
    if len(body) != LINK_SIZE or body[:4] != LINK_MAGIC:
        raise FormatError("not a cryptfs link entry")
    if body[4] != ENTRY_VERSION or body[5:8] != b"\0\0\0":
        raise FormatError(f"unsupported link entry version {body[4]} or flags")
    try:
        plain = AESSIV(vk.entry_key).decrypt(body[24:], [b"cryptfs v1 link", parent_id, name, body[8:24]])
    except InvalidTag:
        raise IntegrityError("link entry failed authentication") from None
    if plain[FILE_ID_SIZE:] != bytes(8):
        raise FormatError("unknown link entry fields")
    return plain[:FILE_ID_SIZE]


def encrypt_backptr(vk: VolumeKeys, dir_id: bytes, parent_id: bytes, name: bytes) -> bytes:
    """A directory's own record of where it belongs: (its id, parent id, name)."""
    nonce = os.urandom(16)
    sealed = AESSIV(vk.entry_key).encrypt(parent_id + name, [b"cryptfs v1 backptr", dir_id, nonce])
    return BACKPTR_MAGIC + bytes([ENTRY_VERSION]) + b"\0\0\0" + nonce + sealed


def decrypt_backptr(vk: VolumeKeys, dir_id: bytes, body: bytes) -> tuple[bytes, bytes]:
    """(parent id, name) from a back-pointer body."""
    if len(body) < 24 + 16 + DIR_ID_SIZE or body[:4] != BACKPTR_MAGIC:
        raise FormatError("not a cryptfs directory back-pointer")
    if body[4] != ENTRY_VERSION:
        raise FormatError(f"unsupported back-pointer version {body[4]}")
    if body[5:8] != b"\0\0\0":
        raise FormatError("unknown back-pointer flags")
    try:
        plain = AESSIV(vk.entry_key).decrypt(body[24:], [b"cryptfs v1 backptr", dir_id, body[8:24]])
    except InvalidTag:
        raise IntegrityError("directory back-pointer failed authentication") from None
    return plain[:DIR_ID_SIZE], plain[DIR_ID_SIZE:]


LEASE_MAGIC = b"CRYL"


def seal_lease(vk: VolumeKeys, plain: bytes) -> bytes:
    """The body of the volume's lease object: its record, readable only with the volume's keys."""
    nonce = os.urandom(16)
    return LEASE_MAGIC + bytes([ENTRY_VERSION]) + b"\0\0\0" + nonce + \
        AESSIV(vk.entry_key).encrypt(plain, [b"cryptfs v1 lease", nonce])


def open_lease(vk: VolumeKeys, body: bytes) -> bytes:
    if len(body) < 24 + 16 or body[:4] != LEASE_MAGIC:
        raise FormatError("not a cryptfs lease")
    if body[4] != ENTRY_VERSION or body[5:8] != b"\0\0\0":
        raise FormatError(f"unsupported lease version {body[4]} or flags")
    try:
        return AESSIV(vk.entry_key).decrypt(body[24:], [b"cryptfs v1 lease", body[8:24]])
    except InvalidTag:
        raise IntegrityError("lease failed authentication") from None


# ---------------------------------------------------------------- attributes

@dataclass(frozen=True)
class Attrs:
    mode: int       # full st_mode including the type bits
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int | None = None  # None: the same as mtime (attribute blobs of version 1 have none)
    rdev: int = 0                # device number of character and block device nodes
    nlink: int = 1               # names of a hard-linked file (attribute version 3)

    def __post_init__(self):
        if self.atime_ns is None:
            object.__setattr__(self, "atime_ns", self.mtime_ns)


ATTR_VERSION = 2
_ATTR_V1 = struct.Struct(">BIIIqq")     # version 1: no atime, no rdev
_ATTR_V2 = struct.Struct(">BIIIqqqQ")   # version 2: atime and rdev appended
_ATTR_V3 = struct.Struct(">BIIIqqqQI")  # version 3: the link count appended (hard-linked files only)
_ATTR_LAYOUTS = {1: _ATTR_V1, 2: _ATTR_V2, 3: _ATTR_V3}
_ATTR_SIZES = {16 + 16 + layout.size: (version, layout) for version, layout in _ATTR_LAYOUTS.items()}


def encrypt_attrs(vk: VolumeKeys, object_key: str, obj_id: bytes, attrs: Attrs) -> bytes:
    """Attribute blob bound to the object's key (relative to the volume) and its id; version 3
    only where a link count other than 1 must be kept."""
    fields = (attrs.mode, attrs.uid, attrs.gid, attrs.mtime_ns, attrs.ctime_ns, attrs.atime_ns, attrs.rdev)
    if attrs.nlink != 1:
        plain = _ATTR_V3.pack(3, *fields, attrs.nlink)
    else:
        plain = _ATTR_V2.pack(ATTR_VERSION, *fields)
    nonce = os.urandom(16)
    return nonce + AESSIV(vk.attr_key).encrypt(
        plain, [b"cryptfs v1 attrs", object_key.encode(), obj_id, nonce])


def decrypt_attrs(vk: VolumeKeys, object_key: str, obj_id: bytes, blob: bytes) -> Attrs:
    version, layout = _ATTR_SIZES.get(len(blob), (None, None))
    if layout is None:
        raise IntegrityError("attribute blob has a bad length")
    try:
        plain = AESSIV(vk.attr_key).decrypt(
            blob[16:], [b"cryptfs v1 attrs", object_key.encode(), obj_id, blob[:16]])
    except InvalidTag:
        raise IntegrityError("attribute blob failed authentication") from None
    fields = layout.unpack(plain)
    if fields[0] != version:
        raise FormatError(f"unsupported attribute version {fields[0]}")
    return Attrs(*fields[1:])


def file_metadata(vk: VolumeKeys, object_key: str, file_id: bytes, wrapped_key: bytes,
                  attrs: Attrs) -> dict[str, str]:
    """User metadata of a file object: always carries the wrapped key with the attributes."""
    return {META_VERSION: str(ENTRY_VERSION), META_ID: b64e(file_id), META_KEY: b64e(wrapped_key),
            META_ATTR: b64e(encrypt_attrs(vk, object_key, file_id, attrs))}


def dirent_metadata(vk: VolumeKeys, object_key: str, dir_id: bytes, attrs: Attrs) -> dict[str, str]:
    return {META_VERSION: str(ENTRY_VERSION), META_ID: b64e(dir_id),
            META_ATTR: b64e(encrypt_attrs(vk, object_key, dir_id, attrs))}


@dataclass(frozen=True)
class ParsedMeta:
    obj_id: bytes
    wrapped_key: bytes | None
    attr_blob: bytes


def parse_metadata(meta: dict[str, str]) -> ParsedMeta:
    if meta.get(META_VERSION) != str(ENTRY_VERSION):
        raise FormatError(f"unsupported or missing metadata version {meta.get(META_VERSION)!r}")
    try:
        obj_id = b64d(meta[META_ID])
        blob = b64d(meta[META_ATTR])
    except KeyError as exc:
        raise FormatError(f"metadata field {exc} missing") from None
    wrapped = b64d(meta[META_KEY]) if META_KEY in meta else None
    if len(obj_id) != FILE_ID_SIZE:
        raise FormatError("bad object id in metadata")
    return ParsedMeta(obj_id, wrapped, blob)
