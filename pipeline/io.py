"""File helpers every stage uses: atomic writes, checksums, and zstd-compressed JSON lines.

Atomicity (DESIGN invariant 4): outputs are written under a temporary name in the same
directory, fsynced, then renamed, so a reader never sees half a file. The temporary file or
folder gets the permissions the user's umask gives any new file (mkstemp/mkdtemp would make
them owner-only), so outputs on a shared filesystem are readable by the group as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.errors import DataError

TMP_PREFIX = ".tmp-"


def umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe for that instant; only where /proc is missing
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # what open() would have given; mkstemp makes it 0600
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on clean exit rename it to `path` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~umask())  # what mkdir would have given; mkdtemp makes it 0700
        yield tmp
        _umask_files(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_files(folder: Path) -> None:
    """Give the files written into `folder` the mode the umask gives new files: libraries that write
    through a temp file (safetensors' save_file, hence save_pretrained) leave them owner-only (0600)."""
    mode = 0o666 & ~umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode | (f.stat().st_mode & 0o111))


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as pretty JSON, atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temp files/dirs left by a killed writer; returns how many were removed."""
    n = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for p in directory.glob(TMP_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def write_jsonl_zst(path: str | os.PathLike, rows: list[dict], level: int = 3) -> int:
    """Write rows as zstd-compressed JSON lines, atomically; returns bytes written."""
    import zstandard

    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    # threads=0 and a fixed level make the compressed bytes a pure function of the rows.
    data = zstandard.ZstdCompressor(level=level).compress(raw)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return len(data)


def read_jsonl_zst(path: str | os.PathLike) -> Iterator[dict]:
    """Stream rows from a zstd-compressed JSON-lines file (several concatenated frames are fine).
    A file whose last frame never ends raises DataError after its complete lines: a truncated
    shard must not read as a shorter, valid one."""
    tail = b""
    for chunk in zstd_chunks(path):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from (json.loads(line) for line in lines if line.strip())
    if tail.strip():
        yield json.loads(tail)


def zstd_chunks(path: str | os.PathLike, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a zstd file (concatenated frames too); DataError naming it when it is
    not zstd or its last frame never ends."""
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()
    with open(path, "rb") as fh:
        try:
            while chunk := fh.read(size):
                while chunk:  # a fresh decompressor for each concatenated frame
                    yield d.decompress(chunk)
                    chunk = d.unused_data if d.eof else b""
                    if chunk:
                        d = zstandard.ZstdDecompressor().decompressobj()
        except zstandard.ZstdError as exc:
            raise DataError(f"{path}: unreadable zstd ({exc})") from None
    if not d.eof:
        raise DataError(
            f"{path}: unreadable: truncated zstd stream (its last frame never ends, or the file is empty)"
        )
