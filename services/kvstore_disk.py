"""The KV store's disk tier on a local directory (kvstore.DiskBackend on the real filesystem).

Layout: `<root>/<2 hex digits>/<name>`, the subdirectory chosen by CRC-32 of the name, so no
directory holds more than ~1/256 of the files. The file format is kvstore/disk_format.py;
this module moves opaque bytes.

Atomicity (why a restart never sees half a block): `write` puts the bytes in
`<name>.tmp`, fsyncs it, renames it over `<name>` (atomic on POSIX), then fsyncs the
directory so the rename itself survives a power cut. A crash leaves either the old file,
the new file, or a `.tmp` leftover, which `scan()` (and the constructor) delete. Files
that are torn anyway (a filesystem that lied about fsync, a disk full mid-write) are caught
by the core: size and checksums in the header (kvstore/disk_format.py).

Single-threaded like the core: one writer per directory (`FileDiskBackend` takes an
exclusive flock on `<root>/.lock` so a second store on the same directory fails fast).
"""

from __future__ import annotations

import fcntl
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvstore.types import Buffer

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
TMP_SUFFIX = ".tmp"


class DirectoryLocked(RuntimeError):
    """Another process has this disk tier open."""


class FileDiskBackend:
    """Block files under `root`; `fsync=False` trades crash durability for speed (tests, benchmarks)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise DirectoryLocked(f"{self.root} is in use by another KV store") from e
        self._dirs: set[str] = set()

    def close(self) -> None:
        """Release the directory lock (the files stay)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> FileDiskBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, name: str) -> Path:
        """Where the file `name` lives (checks the name: no separators, no traversal)."""
        if not _NAME.fullmatch(name) or name.endswith(TMP_SUFFIX) or name.startswith("."):
            raise ValueError(f"bad block file name {name!r}")
        return self.root / f"{zlib.crc32(name.encode()) & 0xFF:02x}" / name

    def write(self, name: str, parts: Sequence[Buffer] | Buffer) -> None:
        """Atomically replace `name` with the concatenation of `parts` (tmp + fsync + rename + dir fsync)."""
        path = self.path(name)
        d = path.parent
        if d.name not in self._dirs:
            d.mkdir(exist_ok=True)
            self._dirs.add(d.name)
        if isinstance(parts, (bytes, bytearray, memoryview)):
            parts = [parts]
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:  # its subdirectory was removed behind our back
            d.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for p in parts:
                view = memoryview(p).cast("B")
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read(self, name: str, limit: int | None = None) -> bytes | None:
        """The file's bytes (the first `limit` of them), or None if it does not exist."""
        try:
            with open(self.path(name), "rb", buffering=0) as f:
                return f.read() if limit is None else f.read(limit)
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        """Remove `name` if it exists."""
        self.path(name).unlink(missing_ok=True)

    def scan(self) -> Iterator[tuple[str, int]]:
        """(name, size) of every block file, oldest (by mtime) first.

        Deletes the regular files no completed `write` leaves: `.tmp` leftovers of interrupted
        writes, bad names, files in the wrong subdirectory. Anything else (entries outside the
        two-hex-digit subdirectories, links, directories) is not ours and is left alone.
        """
        found: list[tuple[int, str, int]] = []
        for d in sorted(self.root.iterdir()):
            if not re.fullmatch(r"[0-9a-f]{2}", d.name) or d.is_symlink() or not d.is_dir():
                continue
            self._dirs.add(d.name)
            with os.scandir(d) as it:
                for e in it:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    try:
                        ok = self.path(e.name).parent == d
                    except ValueError:  # bad name (including .tmp leftovers)
                        ok = False
                    if not ok:
                        os.unlink(e.path)
                        continue
                    st = e.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, e.name, st.st_size))
        found.sort()
        for _, name, size in found:
            yield name, size

