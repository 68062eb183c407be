"""The volume config object: create, sign, find, open (verify and unlock), update.

The config is JSON `{"body": ..., "signature": ...}` at `<prefix>cryptfs.volume`, with a
second copy at `<prefix>cryptfs.volume.bak`. The body is signed by the owner key (RSA-PSS);
every open verifies that signature against the owner fingerprint derived from the key the
passphrase unlocked, and against the fingerprint this machine recorded before; the
generation number never goes backwards. docs/format.md describes every field.
"""

import datetime
import json
import os
import threading
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from . import format as fmt
from . import keys, localstate
from .backend.base import Backend
from .errors import (AlreadyExists, FormatError, IntegrityError, KeyMismatch, NotFound,
                     PreconditionFailed, VolumeNotFound)

CONFIG_NAME = "cryptfs.volume"
BACKUP_NAME = "cryptfs.volume.bak"
FORMAT_NAME = "cryptfs-volume"


def state_dir() -> str:
    return os.environ.get("CRYPTFS_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "cryptfs")


class KnownVolumes:
    """This machine's record of each volume's owner fingerprint and highest generation seen.

    A module-level lock serialises read-modify-write within the process; the file is
    replaced atomically so a crash never leaves it half-written.
    """

    _lock = threading.Lock()

    def __init__(self, path: str | None = None):
        self.path = path or os.path.join(state_dir(), "known_volumes.json")

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            raise FormatError(f"{self.path} is corrupt; move it away to trust volumes afresh") from None

    def check_and_record(self, volume_id: str, fp: str, generation: int, url: str) -> None:
        with self._lock:
            known = self._load()
            seen = known.get(volume_id)
            if seen:
                if seen["fingerprint"] != fp:
                    raise KeyMismatch(f"volume {url} is signed by owner key {fp}, but this machine "
                                      f"knows it as {seen['fingerprint']}: refusing a swapped key")
                if generation < seen["generation"]:
                    raise IntegrityError(f"volume config of {url} went back from generation "
                                         f"{seen['generation']} to {generation} (rolled back?)")
                if generation == seen["generation"] and seen.get("url") == url:
                    return
            known[volume_id] = {"fingerprint": fp, "generation": generation, "url": url}
            localstate.private_dir(os.path.dirname(self.path))
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(localstate.private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, self.path)


@dataclass
class Volume:
    """An opened volume: the backend, where it lives, and its unwrapped keys (memory only)."""
    backend: Backend
    prefix: str                      # "" or "some/prefix/"
    body: dict
    etag: str
    volume_keys: fmt.VolumeKeys
    content_public: rsa.RSAPublicKey
    data_keys: keys.DataKeyCache
    owner_private: rsa.RSAPrivateKey | None = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return self.body["block_size"]

    @property
    def layout(self) -> fmt.Layout:
        """How this volume's file objects are laid out (its format version decides)."""
        return fmt.Layout(self.body["block_size"], self.body["version"])

    @property
    def volume_id(self) -> str:
        return self.body["volume_id"]

    @property
    def url(self) -> str:
        return self.backend.url + "/" + self.prefix

    def owner_fingerprint(self) -> str:
        return self.body["owner_fingerprint"]

    # ------------------------------------------------------------ updates

    def change_passphrase(self, new_passphrase: bytes) -> None:
        if self.owner_private is None:
            raise FormatError("volume opened without its owner key")
        body = dict(self.body)
        body["owner_private_key"] = keys.protect_private_key(self.owner_private, new_passphrase)
        body["generation"] = self.body["generation"] + 1
        self.etag = _store(self.backend, self.prefix, body, self.owner_private, if_match=self.etag)
        self.body = body
        KnownVolumes().check_and_record(self.volume_id, self.owner_fingerprint(), body["generation"], self.url)


def _store(backend: Backend, prefix: str, body: dict, owner, if_match: str | None = None,
           create: bool = False) -> str:
    envelope = {"body": body, "signature": keys.sign(owner, keys.canonical_json(body)).hex()}
    raw = json.dumps(envelope, indent=1, sort_keys=True).encode()
    etag = backend.put(prefix + CONFIG_NAME, raw, if_none_match=create, if_match=if_match)
    backend.put(prefix + BACKUP_NAME, raw)
    return etag


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def create(backend: Backend, prefix: str, passphrase: bytes, block_size: int = fmt.DEFAULT_BLOCK_SIZE,
           rsa_bits: int = keys.DEFAULT_RSA_BITS, version: int = fmt.VERSION) -> Volume:
    """Write a new volume's config and root directory; AlreadyExists if one is there."""
    prefix = normalize_prefix(prefix)
    backend.check()
    for name in (CONFIG_NAME, BACKUP_NAME):
        try:
            backend.head(prefix + name)
            raise AlreadyExists(f"a cryptfs volume already exists at {backend.url}/{prefix}")
        except NotFound:
            pass
    fmt.Layout(block_size, version)
    owner = keys.generate_rsa(rsa_bits)
    content = keys.generate_rsa(rsa_bits)
    secret = os.urandom(32)
    owner_fp = keys.fingerprint(owner)
    body = {
        "format": FORMAT_NAME, "version": version, "generation": 1,
        "volume_id": os.urandom(16).hex(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "block_size": block_size,
        "owner_public_key": keys.public_pem(owner), "owner_fingerprint": owner_fp,
        "owner_private_key": keys.protect_private_key(owner, passphrase),
        "content_public_key": keys.public_pem(content), "content_fingerprint": keys.fingerprint(content),
        "recipients": [{
            "name": "owner", "fingerprint": owner_fp, "public_key": keys.public_pem(owner),
            "content_private_key": keys.wrap_private_key(owner.public_key(), content),
            "volume_secret": keys.wrap(owner.public_key(), secret, keys.SECRET_LABEL).hex(),
        }],
    }
    try:
        etag = _store(backend, prefix, body, owner, create=True)
    except PreconditionFailed:
        raise AlreadyExists(f"a cryptfs volume already exists at {backend.url}/{prefix}") from None
    vk = fmt.VolumeKeys.derive(secret)
    vol = Volume(backend, prefix, body, etag, vk, content.public_key(), keys.DataKeyCache(content), owner)
    KnownVolumes().check_and_record(str(body["volume_id"]), owner_fp, 1, vol.url)
    return vol


def read_config(backend: Backend, prefix: str) -> tuple[dict, str]:
    """(envelope, etag) of the volume config, falling back to the backup copy."""
    problems: list[Exception] = []
    for name in (CONFIG_NAME, BACKUP_NAME):
        try:
            raw, info = backend.get(prefix + name)
            return json.loads(raw), info.etag
        except NotFound:
            pass
        except FormatError as exc:   # foreign: the other copy may do
            problems.append(exc)
        except ValueError as exc:
            problems.append(FormatError(f"volume config {prefix + name} is not valid JSON ({exc})"))
    if not problems:
        raise VolumeNotFound(f"no cryptfs volume at {backend.url}/{prefix}")
    raise problems[0]


def find_prefix(backend: Backend, path: str) -> str:
    """The longest prefix of `path` that holds a volume config (the volume root)."""
    parts = [p for p in path.strip("/").split("/") if p]
    for n in range(len(parts), -1, -1):
        prefix = normalize_prefix("/".join(parts[:n]))
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError:
            continue  # a name that is not UTF-8 cannot be part of an object key, only a path inside
        for name in (CONFIG_NAME, BACKUP_NAME):
            try:
                backend.head(prefix + name)
                return prefix
            except NotFound:
                continue
    raise VolumeNotFound(f"no cryptfs volume at {backend.url}/{path.strip('/')} or any parent of it")


def open_volume(backend: Backend, prefix: str, passphrase: bytes,
                expected_fingerprint: str | None = None) -> Volume:
    """Unlock a volume with the owner's passphrase, verifying the signed config."""
    prefix = normalize_prefix(prefix)
    envelope, etag = read_config(backend, prefix)
    body = _check_envelope(envelope)
    owner = keys.unlock_private_key(body["owner_private_key"], passphrase)
    fp = keys.fingerprint(owner)
    if fp != body["owner_fingerprint"] or keys.fingerprint(keys.load_public_pem(body["owner_public_key"])) != fp:
        raise KeyMismatch("the volume config names an owner key other than the one the passphrase unlocks")
    if expected_fingerprint and expected_fingerprint != fp:
        raise KeyMismatch(f"volume owner key is {fp}, expected {expected_fingerprint}")
    if not keys.verify(owner.public_key(), keys.canonical_json(body), bytes.fromhex(envelope["signature"])):
        raise KeyMismatch("volume config signature is invalid: the config was altered without the owner key")
    url = f"{backend.url}/{prefix}"
    KnownVolumes().check_and_record(body["volume_id"], fp, int(body["generation"]), url)
    mine = [r for r in body["recipients"] if r["fingerprint"] == fp]
    if not mine:
        raise KeyMismatch("the owner is not a recipient of this volume's keys")
    content = keys.unwrap_private_key(owner, mine[0]["content_private_key"])
    content_pub = keys.load_public_pem(body["content_public_key"])
    if not keys.fingerprint(content) == keys.fingerprint(content_pub) == body["content_fingerprint"]:
        raise KeyMismatch("content public key in the config does not match the content private key")
    secret = keys.unwrap(owner, bytes.fromhex(mine[0]["volume_secret"]), keys.SECRET_LABEL)
    return Volume(backend, prefix, body, etag, fmt.VolumeKeys.derive(secret), content_pub,
                  keys.DataKeyCache(content), owner)


def _check_envelope(envelope) -> dict:
    try:
        body = envelope["body"]
        envelope["signature"]
        if body["format"] != FORMAT_NAME:
            raise FormatError(f"not a cryptfs volume config (format {body['format']!r})")
        if body["version"] not in fmt.VERSIONS:
            raise FormatError(f"unsupported volume format version {body['version']} "
                              f"(this cryptfs reads versions {', '.join(map(str, fmt.VERSIONS))})")
        fmt.Layout(body["block_size"], body["version"])
        return body
    except (KeyError, TypeError):
        raise FormatError("volume config is malformed") from None
