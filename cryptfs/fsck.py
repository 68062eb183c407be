"""Volume check: walk the tree from the root, authenticate every entry, attribute and block.

Names what it finds: tampered blocks, truncated or extended objects, foreign objects, keys
that cannot be unwrapped, stale or orphaned directories, abandoned multipart uploads.
Reads only, unless asked to repair. A repair touches only what it can prove is this
volume's (the name or back-pointer authenticates under the volume's keys):

- a stale directory entry whose directory points back to another, existing entry: removed;
- a stale entry that is its directory's only way in (no back-pointer, or one naming an
  entry that is gone): the back-pointer is rewritten to it;
- an orphaned directory (its back-pointer proves it ours, no entry names it): removed when
  empty (an interrupted mkdir), linked into /lost+found when it holds anything;
- an unfinished multipart upload to a key of this volume: aborted.

Everything else (foreign objects, tampered data) is reported and left alone.
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
    repaired: list[str] = field(default_factory=list)
    files: int = 0
    directories: int = 0
    bytes: int = 0

    def add(self, kind: str, where: str, detail: str) -> None:
        self.problems.append((kind, where, detail))

    @property
    def clean(self) -> bool:
        return not self.problems


def check(store: Store, repair: bool = False, abort_uploads: bool = False, on_file=None) -> Report:
    """Walk and verify the volume; `repair` fixes what is provably ours (see above);
    `abort_uploads` aborts every unfinished upload under the volume's prefix, ours or not."""
    report = Report()
    reached: set[str] = set(VOLUME_OBJECTS)  # volume-relative keys, as everywhere here
    ours: dict[str, bytes] = {}  # directory prefix -> its id, for every directory proved ours
    try:
        root = store.root()
    except (CryptfsError, KeyError) as exc:
        report.add("root", "/", f"root directory record unreadable: {exc}")
        root = Entry(fmt.ROOT_DIR_ID, b"", store.backptr_key(fmt.ROOT_DIR_ID), True, fmt.ROOT_DIR_ID, 0, "", 0, None)
    todo = [(root, "")]

    def walk() -> None:
        while todo:
            directory, path = todo.pop()
            report.directories += 1
            _walk_dir(store, directory, path, report, reached, ours, todo, repair, on_file)

    walk()
    orphans = _orphaned_dirs(store, reached)
    for prefix, (child, rel) in sorted(orphans.items()):
        ours[prefix] = child
        members = [info.key for info in store.list_objects(prefix) if info.key not in reached]
        if members == [rel]:
            report.add(
                "orphan-directory",
                rel,
                "empty directory no entry names (an interrupted mkdir)" + ("; removed" if repair else ""),
            )
            if repair:
                store.delete_key(rel)
                report.repaired.append(f"removed empty orphaned directory {rel}")
            reached.update(members)
            continue
        report.add(
            "orphan-directory",
            rel,
            f"directory with {len(members) - 1} object(s) that no entry names"
            + ("; linked into /lost+found" if repair else ""),
        )
        if repair:
            entry = _link_lost(store, child, rel)
            report.repaired.append(f"linked orphaned directory {rel} as /lost+found/{entry.name.decode()}")
            todo.append((entry, "/lost+found/" + entry.name.decode()))
            walk()
        reached.update(members)
    for info in store.list_objects():
        if info.key not in reached:
            report.add(
                "foreign",
                store.abs_key(info.key),
                "object is not part of this volume's tree (foreign, orphaned, or left by an interrupted operation)",
            )
    for upload in store.pending_uploads():
        abort = abort_uploads or (repair and _is_ours(store, ours, upload.key))
        where = store.abs_key(upload.key)
        report.add(
            "abandoned-upload",
            where,
            f"unfinished multipart upload {upload.upload_id}" + (" (aborted)" if abort else ""),
        )
        if abort:
            store.abort_upload(upload.key, upload.upload_id)
            report.repaired.append(f"aborted multipart upload {upload.upload_id} to {where}")
    return report


def _walk_dir(
    store: Store,
    directory: Entry,
    path: str,
    report: Report,
    reached: set,
    ours: dict,
    todo: list,
    repair: bool,
    on_file,
) -> None:
    reached.add(store.backptr_key(directory.obj_id))
    prefix = fmt.dir_prefix(store.vk, directory.obj_id)
    ours[prefix] = directory.obj_id
    for info in store.list_objects(prefix):
        suffix = info.key[len(prefix) :]
        if suffix == fmt.BACKPTR_NAME:
            continue
        try:
            name = fmt.decrypt_name(store.vk, directory.obj_id, suffix)
        except (FormatError, IntegrityError):
            continue  # reported below as not part of the tree
        reached.add(info.key)
        where = f"{path}/{name.decode(errors='replace')}"
        try:
            entry = store.stat_listed(directory.obj_id, name, info.key, info.size)
        except NotFound:
            continue
        except CryptfsError as exc:
            report.add("metadata", where, f"{exc} (object {store.abs_key(info.key)})")
            continue
        if entry.link_key is not None:
            reached.add(entry.key)  # a hard-linked file's object, reached through its names
        if entry.is_dir:
            try:
                canonical = store.check_backptr(entry)
            except CryptfsError as exc:
                report.add("metadata", where, f"directory record unreadable: {exc}")
                continue
            if not canonical and _stale(store, entry, where, report, repair):
                continue
            todo.append((entry, where))
        else:
            _check_file(store, entry, where, report)
            if on_file:
                on_file(report)


def _stale(store: Store, entry: Entry, where: str, report: Report, repair: bool) -> bool:
    """Report (and repair) a stale directory entry; True if it is not to be walked."""
    try:
        points_to = store.read_backptr(entry.obj_id)
    except CryptfsError:
        points_to = None
    canonical = None
    if points_to is not None:
        try:
            canonical, _ = store.lookup(*points_to)
        except (CryptfsError, KeyError):
            canonical = None
    if canonical is not None and canonical.is_dir and canonical.obj_id == entry.obj_id:
        report.add(
            "stale-directory",
            where,
            f"entry names a directory that points back elsewhere "
            f"(object {entry.key})" + ("; removed" if repair else ""),
        )
        if repair:
            store.delete_key(entry.key)
            report.repaired.append(f"removed stale directory entry {where}")
        return True
    report.add(
        "stale-directory",
        where,
        f"entry names a directory that points back to no entry "
        f"(object {entry.key})" + ("; made its entry again" if repair else ""),
    )
    if repair:
        store.write_backptr(entry.obj_id, entry.parent_id, entry.name, entry.attrs)
        report.repaired.append(f"pointed directory {where} back to its entry")
        return False
    return True


def _orphaned_dirs(store: Store, reached: set) -> dict[str, tuple[bytes, str]]:
    """Unreached back-pointers that prove themselves this volume's: prefix -> (id, key)."""
    found = {}
    for info in store.list_objects("t/"):
        rel = info.key
        if rel in reached or not rel.endswith("/" + fmt.BACKPTR_NAME):
            continue
        try:
            info = store.head(rel)
        except NotFound:
            continue
        child = store.backptr_id(rel, info)
        if child is not None:
            found[fmt.dir_prefix(store.vk, child)] = (child, rel)
    return found


def _is_ours(store: Store, ours: dict[str, bytes], key: str) -> bool:
    """Whether an object key is an entry name of a directory proved to be this volume's."""
    for prefix, dir_id in ours.items():
        if key.startswith(prefix):
            try:
                fmt.decrypt_name(store.vk, dir_id, key[len(prefix) :])
                return True
            except (FormatError, IntegrityError):
                return False
    return False


def _link_lost(store: Store, child: bytes, rel: str) -> Entry:
    """Give an orphaned directory an entry in /lost+found (created if need be)."""
    info = store.head(rel)
    attrs = fmt.decrypt_attrs(store.vk, rel, child, fmt.parse_metadata(info.metadata or {}).attr_blob)
    return store.link_dir(store.lost_and_found().obj_id, f"dir-{child.hex()[:16]}".encode(), child, attrs)


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
