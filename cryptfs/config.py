"""Settings: named volumes from YAML, overridden by command-line flags; unknown keys rejected.

Locations: --config FILE, else $CRYPTFS_CONFIG, else ~/.config/cryptfs/config.yaml if present.
AWS credentials are never read from here: boto3's own chain (env, profile, role) supplies them.
"""

import math
import os
from dataclasses import dataclass, fields

import yaml

from .errors import UsageError


@dataclass
class VolumeSettings:
    url: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    path_style: bool = False
    verify_tls: bool = True
    retry_mode: str = "standard"  # or "adaptive"
    max_attempts: int = 5
    owner_fingerprint: str | None = None  # refuse a volume signed by any other owner key
    passphrase_file: str | None = None  # readable by its owner alone
    cache_dir: str | None = None
    cache_size_mb: int = 2048  # ciphertext block cache on local disk
    cache_size: int | None = None  # the same in bytes, given with a unit (2GiB); wins over cache_size_mb
    min_free: int = 0  # bytes the cache directory's disk keeps free: staging writes fail (ENOSPC) below it
    staging_size: int | None = None  # bound of the staging files: writes wait for uploads beyond it
    memory_cache_mb: int = 256  # decrypted blocks in memory
    writeback_delay: float = 2.0  # seconds after close before the upload starts
    fsync: str = "upload"  # "upload": durable in S3; "journal": durable locally
    attr_ttl: float = 5.0  # seconds a cached listing or attribute is trusted
    lease_duration: float = 60.0  # seconds a read-write mount's lease lasts unrenewed
    workers: int = 8


FIELDS = {f.name for f in fields(VolumeSettings)}
# (type, lowest, highest or None) of each number, and the words a choice may be
NUMBERS = {
    "max_attempts": (int, 1, 100),
    "workers": (int, 1, 256),
    "cache_size_mb": (int, 0, None),
    "memory_cache_mb": (int, 0, None),
    "writeback_delay": (float, 0, 86400),
    "attr_ttl": (float, 0, None),
    "lease_duration": (float, 3, 86400),
}
SIZES = {"cache_size", "min_free", "staging_size"}  # bytes: a whole number, or with a unit (512MiB, 2GiB, 1.5G)
UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
UNITS.update({u + "ib": v for u, v in UNITS.items() if u not in ("", "b")})
UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
CHOICES = {"retry_mode": ("standard", "adaptive"), "fsync": ("upload", "journal")}
SWITCHES = {"path_style", "verify_tls"}


def check_number(value, kind: type, low: float, high: float | None, what: str):
    """`value` as a `kind` in [low, high]; UsageError saying what `what` must be."""
    ok = (
        isinstance(value, int if kind is int else (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
        and (high is None or value <= high)
    )
    if not ok:
        noun = "a whole number" if kind is int else "a number"
        bounds = f"from {low}" + (f" to {high}" if high is not None else "")
        raise UsageError(f"{what} must be {noun} {bounds}, not {value!r}")
    return kind(value)


def parse_number(text: str, kind: type, low: float, high: float | None, what: str):
    """A number given on the command line, checked like check_number."""
    try:
        value = kind(text)
    except ValueError:
        value = text
    return check_number(value, kind, low, high, what)


def parse_size(value, what: str) -> int:
    """Bytes from 2048, "512MiB", "2GiB", "1.5G" or "10GB"; UsageError saying what is allowed."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("bkmgti")
    try:
        size = float(number) * UNITS[text[len(number) :]]
    except (KeyError, ValueError):
        size = -1.0
    if isinstance(value, bool) or not math.isfinite(size) or size < 0:
        raise UsageError(
            f"{what} must be a size: a number of bytes, or one with a unit (KiB, MiB, GiB, TiB; "
            f"KB, MB, GB, TB), such as 2GiB; not {value!r}"
        )
    return int(size)


def check(name: str, value, what: str | None = None):
    """The value of setting `name`, or UsageError saying what it must be (`what` names it)."""
    what = what or name
    if name in SIZES:
        return None if value is None and name in ("cache_size", "staging_size") else parse_size(value, what)
    if name in NUMBERS:
        return check_number(value, *NUMBERS[name], what)
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise UsageError(f"{what} must be {' or '.join(CHOICES[name])}, not {value!r}")
    elif name in SWITCHES:
        if not isinstance(value, bool):
            raise UsageError(f"{what} must be true or false, not {value!r}")
    elif not (isinstance(value, str) and value) and not (value is None and name != "url"):
        raise UsageError(f"{what} must be a non-empty string, not {value!r}")
    return value


def default_path() -> str | None:
    path = os.environ.get("CRYPTFS_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "cryptfs", "config.yaml"
    )
    return path if os.path.exists(path) else None


def from_text(name: str, text: str | bool, what: str):
    """The value of setting `name` given as text (a mount option; True when given bare)."""
    if name in SWITCHES:
        words = {True: True, "true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        value = words.get(text.lower() if isinstance(text, str) else text, text)
        return check(name, value, what)
    if not isinstance(text, str):
        raise UsageError(f"{what} needs a value ({what}=...)")
    if name in NUMBERS:
        return parse_number(text, *NUMBERS[name], what)
    return check(name, text, what)


def cache_bytes(settings: VolumeSettings) -> int:
    """The disk cache's bound: cache_size when given, else cache_size_mb."""
    return settings.cache_size if settings.cache_size is not None else settings.cache_size_mb << 20


def load(path: str | None) -> dict[str, VolumeSettings]:
    """Named volumes from a YAML file: {'volumes': {name: {url: ..., ...}}}."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"volumes"} or not isinstance(doc.get("volumes") or {}, dict):
        raise UsageError(f"{path}: the top level holds only 'volumes', a mapping of names to volumes")
    out = {}
    for name, entry in (doc.get("volumes") or {}).items():
        if not isinstance(entry, dict) or "url" not in entry:
            raise UsageError(f"{path}: volume {name!r} needs a url")
        unknown = set(entry) - FIELDS
        if unknown:
            raise UsageError(f"{path}: volume {name!r} has unknown keys: {', '.join(sorted(unknown))}")
        out[str(name)] = VolumeSettings(
            **{key: check(key, value, f"{path}: volume {name!r}: {key}") for key, value in entry.items()}
        )
    return out


def settings_for(target: str, volumes: dict[str, VolumeSettings]) -> tuple[str, VolumeSettings]:
    """(url, settings) for a URL or 'name[/path]'; a URL inherits the settings of the volume it is in."""
    if "://" not in target:
        name, _, rest = target.partition("/")
        if name not in volumes:
            raise UsageError(f"{target!r} is neither a URL (s3://bucket/..., file:///...) nor a configured volume")
        vs = volumes[name]
        return vs.url.rstrip("/") + ("/" + rest if rest else ""), VolumeSettings(**vars(vs))
    best = None
    for vs in volumes.values():
        base = vs.url.rstrip("/")
        if (target == base or target.startswith(base + "/")) and (best is None or len(base) > len(best.url)):
            best = vs
    return target, VolumeSettings(**vars(best)) if best else VolumeSettings(url=target)
