"""Volume check: walk the tree from the root, authenticate every entry, attribute and block.

Names what it finds: tampered blocks, truncated or extended objects, foreign objects, keys
that cannot be unwrapped, stale or orphaned directories, abandoned multipart uploads.
Reads only, unless asked to abort abandoned uploads.
"""

from dataclasses import dataclass, field

from . import format as fmt
from .errors import CryptfsError, FormatError, IntegrityError, NotFound
from .store import Entry, Store
from .volume import BACKUP_NAME, CONFIG_NAME

# Top-level objects of a volume that are not part of the tree.
VOLUME_OBJECTS = {CONFIG_NAME, BACKUP_NAME, "cryptfs.lease"}


@dataclass
class Report:
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, where, detail)
    files: int = 0
    directories: int = 0
    bytes: int = 0

    def add(self, kind: str, where: str, detail: str) -> None:
        self.problems.append((kind, where, detail))

    @property
    def clean(self) -> bool:
        return not self.problems


def check(store: Store, abort_uploads: bool = False, on_file=None) -> Report:
    report = Report()
    reached: set[str] = {store.abs_key(n) for n in VOLUME_OBJECTS}
    try:
        root = store.root()
    except (CryptfsError, KeyError) as exc:
        report.add("root", "/", f"root directory record unreadable: {exc}")
        root = Entry(fmt.ROOT_DIR_ID, b"", store.backptr_key(fmt.ROOT_DIR_ID), True, fmt.ROOT_DIR_ID, 0, "", 0, None)
    todo = [(root, "")]
    while todo:
        directory, path = todo.pop()
        report.directories += 1
        reached.add(store.abs_key(store.backptr_key(directory.obj_id)))
        prefix = store.abs_key(fmt.dir_prefix(store.vk, directory.obj_id))
        for info in store.backend.list(prefix):
            suffix = info.key[len(prefix):]
            if suffix == fmt.BACKPTR_NAME:
                continue
            try:
                name = fmt.decrypt_name(store.vk, directory.obj_id, suffix)
            except (FormatError, IntegrityError):
                continue  # reported below as not part of the tree
            reached.add(info.key)
            where = f"{path}/{name.decode(errors='replace')}"
            try:
                entry = store.stat_listed(directory.obj_id, name, info.key[len(store.vol.prefix):])
            except NotFound:
                continue
            except CryptfsError as exc:
                report.add("metadata", where, f"{exc} (object {info.key})")
                continue
            if entry.is_dir:
                try:
                    canonical = store.check_backptr(entry)
                except CryptfsError as exc:
                    report.add("metadata", where, f"directory record unreadable: {exc}")
                    continue
                if not canonical:
                    report.add("stale-directory", where,
                               f"entry names a directory that points back elsewhere (object {info.key})")
                    continue
                todo.append((entry, where))
            else:
                _check_file(store, entry, where, report)
                if on_file:
                    on_file(where)
    for info in store.backend.list(store.vol.prefix):
        if info.key not in reached:
            report.add("foreign", info.key, "object is not part of this volume's tree "
                       "(foreign, orphaned, or left by an interrupted operation)")
    for upload in store.backend.pending_uploads(store.vol.prefix):
        report.add("abandoned-upload", upload.key, f"unfinished multipart upload {upload.upload_id}"
                   + (" (aborted)" if abort_uploads else ""))
        if abort_uploads:
            store.backend.abort_upload(upload)
    return report


def _check_file(store: Store, entry: Entry, where: str, report: Report) -> None:
    report.files += 1
    try:
        fk = store.file_key(entry)
    except CryptfsError as exc:
        report.add("key", where, f"data key cannot be unwrapped: {exc} (object {entry.key})")
        return
    try:
        header = store.read_header(entry, fk)
        nblocks = fmt.block_count(entry.size, store.block_size)
        for first in range(0, nblocks, 64):
            store.read_blocks(entry, fk, header, first, 64)
        report.bytes += entry.size
    except CryptfsError as exc:
        report.add("content", where, str(exc))
