"""Storage backends: one small interface (base.py), S3 (s3.py) and a local directory (local.py)."""

from .base import Backend, ObjectInfo  # noqa: F401
