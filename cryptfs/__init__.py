"""cryptfs: end-to-end encrypted files on S3-compatible storage, as a CLI and a FUSE mount."""

__version__ = "0.2.0"
