"""Key material: RSA key pairs, fingerprints, RSA-OAEP wrapping, signatures, passphrase protection.

Pure functions over `cryptography` objects; nothing here touches storage or disk.
"""

import hashlib
import json
import os
import threading

from cachetools import LRUCache
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import FormatError, IntegrityError, WrongPassphrase

DEFAULT_RSA_BITS = 3072
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
SCRYPT_MIN_N = 2 ** 17
SCRYPT_MIN_R = 8
DATA_KEY_LABEL = b"cryptfs v1 data key"
SECRET_LABEL = b"cryptfs v1 volume secret"
PRIVATE_KEY_LABEL = b"cryptfs v1 content private key"

_OAEP_HASH = hashes.SHA256


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(_OAEP_HASH()), algorithm=_OAEP_HASH(), label=label)


def generate_rsa(bits: int = DEFAULT_RSA_BITS) -> rsa.RSAPrivateKey:
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"RSA keys of {bits} bits are refused ({MIN_RSA_BITS} to {MAX_RSA_BITS})")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_public_pem(pem: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm):
        raise FormatError("bad public key in volume config") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        raise FormatError("volume config public key is not RSA of at least 2048 bits")
    return key


def fingerprint(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, as 'sha256:<hex>'."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def private_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_der(der: bytes) -> rsa.RSAPrivateKey:
    # Only ever called on authenticated plaintext (AES-GCM under the passphrase or a wrapped
    # key), so the slow consistency check of the key's numbers is skipped.
    key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise FormatError("private key is not RSA")
    return key


def wrap(pub: rsa.RSAPublicKey, secret: bytes, label: bytes) -> bytes:
    return pub.encrypt(secret, _oaep(label))


def unwrap(priv: rsa.RSAPrivateKey, wrapped: bytes, label: bytes) -> bytes:
    try:
        return priv.decrypt(wrapped, _oaep(label))
    except ValueError:
        raise IntegrityError("wrapped key cannot be unwrapped with this volume's key") from None


def wrap_private_key(pub: rsa.RSAPublicKey, priv: rsa.RSAPrivateKey) -> dict:
    """Hybrid wrap of a private key for a recipient: AES-GCM under a key wrapped with OAEP."""
    aes_key, nonce = os.urandom(32), os.urandom(12)
    return {"wrapped_key": wrap(pub, aes_key, PRIVATE_KEY_LABEL).hex(), "nonce": nonce.hex(),
            "ciphertext": AESGCM(aes_key).encrypt(nonce, private_der(priv), PRIVATE_KEY_LABEL).hex()}


def unwrap_private_key(priv: rsa.RSAPrivateKey, blob: dict) -> rsa.RSAPrivateKey:
    aes_key = unwrap(priv, bytes.fromhex(blob["wrapped_key"]), PRIVATE_KEY_LABEL)
    try:
        der = AESGCM(aes_key).decrypt(bytes.fromhex(blob["nonce"]), bytes.fromhex(blob["ciphertext"]),
                                      PRIVATE_KEY_LABEL)
    except InvalidTag:
        raise IntegrityError("wrapped content key failed authentication") from None
    return load_private_der(der)


def sign(priv: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return priv.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                       salt_length=padding.PSS.DIGEST_LENGTH), hashes.SHA256())


def verify(pub: rsa.RSAPublicKey, data: bytes, signature: bytes) -> bool:
    try:
        pub.verify(signature, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                salt_length=padding.PSS.DIGEST_LENGTH), hashes.SHA256())
        return True
    except InvalidSignature:
        return False


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- passphrase protection

def protect_private_key(priv: rsa.RSAPrivateKey, passphrase: bytes, n: int = SCRYPT_MIN_N,
                        r: int = SCRYPT_MIN_R, p: int = 1) -> dict:
    """The owner's private key under scrypt(passphrase); parameters bound as associated data."""
    params = {"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": os.urandom(16).hex(),
              "fingerprint": fingerprint(priv)}
    key = _scrypt(passphrase, params)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, private_der(priv), canonical_json(params))
    return {**params, "nonce": nonce.hex(), "ciphertext": ct.hex()}


def unlock_private_key(blob: dict, passphrase: bytes) -> rsa.RSAPrivateKey:
    params = {k: blob[k] for k in ("kdf", "n", "r", "p", "salt", "fingerprint")}
    key = _scrypt(passphrase, params)
    try:
        der = AESGCM(key).decrypt(bytes.fromhex(blob["nonce"]), bytes.fromhex(blob["ciphertext"]),
                                  canonical_json(params))
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase") from None
    priv = load_private_der(der)
    if fingerprint(priv) != params["fingerprint"]:
        raise IntegrityError("owner key does not match its recorded fingerprint")
    return priv


def _scrypt(passphrase: bytes, params: dict) -> bytes:
    if params["kdf"] != "scrypt":
        raise FormatError(f"unknown key derivation {params['kdf']!r}")
    n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
    if n < SCRYPT_MIN_N or r < SCRYPT_MIN_R or p < 1:
        raise FormatError(f"scrypt parameters below the minimum (N=2^17, r=8): N={n} r={r}")
    return Scrypt(salt=bytes.fromhex(params["salt"]), length=32, n=n, r=r, p=p).derive(passphrase)


# ---------------------------------------------------------------- data-key cache

class DataKeyCache:
    """Unwrapped per-file data keys, in memory only, keyed by the wrapped bytes.

    One lock guards the LRU; the RSA work runs outside it.
    """

    def __init__(self, content_private: rsa.RSAPrivateKey | None, size: int = 4096):
        self._priv = content_private
        self._lru: LRUCache = LRUCache(size)
        self._lock = threading.Lock()

    def unwrap(self, wrapped: bytes) -> bytes:
        with self._lock:
            hit = self._lru.get(wrapped)
        if hit is not None:
            return hit
        if self._priv is None:
            from .errors import ReadOnly
            raise ReadOnly("this host has no content private key: file contents cannot be read")
        key = unwrap(self._priv, wrapped, DATA_KEY_LABEL)
        if len(key) != 32:
            raise IntegrityError("unwrapped data key has a bad length")
        with self._lock:
            self._lru[wrapped] = key
        return key

    def remember(self, wrapped: bytes, key: bytes) -> None:
        with self._lock:
            self._lru[wrapped] = key
