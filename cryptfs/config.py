"""Settings: named volumes from YAML, overridden by command-line flags; unknown keys rejected.

Locations: --config FILE, else $CRYPTFS_CONFIG, else ~/.config/cryptfs/config.yaml if present.
AWS credentials are never read from here: boto3's own chain (env, profile, role) supplies them.
"""

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
    retry_mode: str = "standard"          # or "adaptive"
    max_attempts: int = 5
    owner_fingerprint: str | None = None  # refuse a volume signed by any other owner key
    cache_dir: str | None = None
    cache_size_mb: int = 2048             # ciphertext block cache on local disk
    memory_cache_mb: int = 256            # decrypted blocks in memory
    writeback_delay: float = 2.0          # seconds after close before the upload starts
    fsync: str = "upload"                 # "upload": durable in S3; "journal": durable locally
    attr_ttl: float = 5.0                 # seconds a cached listing or attribute is trusted
    lease_duration: float = 60.0          # seconds a read-write mount's lease lasts unrenewed
    workers: int = 8


FIELDS = {f.name for f in fields(VolumeSettings)}


def default_path() -> str | None:
    path = os.environ.get("CRYPTFS_CONFIG") or os.path.expanduser("~/.config/cryptfs/config.yaml")
    return path if os.path.exists(path) else None


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
        raise UsageError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"volumes"}:
        raise UsageError(f"{path}: the top level holds only 'volumes'")
    out = {}
    for name, entry in (doc.get("volumes") or {}).items():
        if not isinstance(entry, dict) or "url" not in entry:
            raise UsageError(f"{path}: volume {name!r} needs a url")
        unknown = set(entry) - FIELDS
        if unknown:
            raise UsageError(f"{path}: volume {name!r} has unknown keys: {', '.join(sorted(unknown))}")
        if entry.get("fsync", "upload") not in ("upload", "journal"):
            raise UsageError(f"{path}: volume {name!r}: fsync is 'upload' or 'journal'")
        if not isinstance(entry.get("lease_duration", 60.0), (int, float)) or entry.get("lease_duration", 60.0) < 3:
            raise UsageError(f"{path}: volume {name!r}: lease_duration is a number of seconds, at least 3")
        out[str(name)] = VolumeSettings(**entry)
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
