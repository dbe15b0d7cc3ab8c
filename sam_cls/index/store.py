"""The on-disk index file: a small JSON header (kind, metric, dim, size, checksum) then the raw payload."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import struct
import zlib
from pathlib import Path

from sam_cls.files import NotRegularFileError, open_file

MAGIC = b"SAMCLSIX"  # first 8 bytes of every index file
FORMAT_VERSION = 1
REBUILD_HINT = "run `sam-cls rebuild-index --run RUN_DIR`"


class IndexMismatchError(ValueError):
    """A saved index does not fit what the caller expects, or cannot be read; the message says the fix."""


def write_index_file(path: str | Path, header: dict, payload) -> dict:
    """Write header + payload atomically (tmp file, fsync, os.replace) so a crash never leaves half a file;
    returns the header written, whose payload checksum names this index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(payload).cast("B")
    header = {
        **header,
        "format": FORMAT_VERSION,
        "payload_bytes": view.nbytes,
        "payload_crc32": zlib.crc32(view),
    }
    head = json.dumps(header, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # written by name: no symlink may stand there
        with open_file(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head)
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk says which file it was writing
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return header


def digest(header: dict) -> dict:
    """What identifies an index file's contents: its payload's size and checksum."""
    return {"payload_bytes": header.get("payload_bytes"), "payload_crc32": header.get("payload_crc32")}


def read_header(path: str | Path) -> dict:
    """An index file's header, read without its payload; {} where there is no readable header."""
    try:
        with open_file(path) as f:
            if f.read(len(MAGIC)) != MAGIC:
                return {}
            (head_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(head_len, 1 << 20)))
            return header if isinstance(header, dict) else {}
    except (OSError, ValueError, struct.error):
        return {}


def read_index_file(path: str | Path) -> tuple[dict, bytearray]:
    """Read and verify an index file; any damage raises IndexMismatchError naming the file and the fix."""
    path = Path(path)

    def fail(why: str) -> IndexMismatchError:
        return IndexMismatchError(f"{path}: cannot read index file ({why}); {REBUILD_HINT} to rebuild it")

    try:
        with open_file(path) as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise fail("not a sam-cls index file")
            raw_len = f.read(8)
            head_len = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else 1 << 62
            if head_len > 1 << 20:  # a real header is a few hundred bytes
                raise fail("corrupt header")
            try:
                header = json.loads(f.read(head_len))
                n_bytes, crc = int(header["payload_bytes"]), int(header["payload_crc32"])
            except (ValueError, KeyError, TypeError) as e:  # bad JSON, bad UTF-8, missing fields
                raise fail("corrupt header") from e
            if header.get("format") != FORMAT_VERSION:
                raise fail(f"unsupported format {header.get('format')!r}")
            left = os.fstat(f.fileno()).st_size - f.tell()
            if not 0 <= n_bytes <= left:
                raise fail(f"truncated: {left} of {n_bytes} payload bytes")
            payload = bytearray(n_bytes)  # writable, so faiss and torch can wrap it without copies
            got = f.readinto(payload)
    except FileNotFoundError:
        raise fail("file not found") from None
    except NotRegularFileError as e:  # a FIFO would block the read forever; a symlink is never followed
        raise IndexMismatchError(f"{path} {e.strerror}") from None
    except PermissionError:  # not damage: the fix is a permission, not a rebuild
        raise
    except OSError as e:
        raise fail(f"{type(e).__name__}: {e}") from e
    if got != len(payload):
        raise fail(f"truncated: {got} of {len(payload)} payload bytes")
    if zlib.crc32(payload) != crc:
        raise fail("checksum mismatch, the file is corrupt")
    return header, payload


def check_header(path: str | Path, header: dict, expect: dict) -> None:
    """Compare header fields with expected values; the first difference raises one clear line."""
    for key, want in expect.items():
        got = header.get(key)
        if want is not None and got != want:
            raise IndexMismatchError(
                f"{path}: index {key} is {got!r} but {want!r} was expected; {REBUILD_HINT} to rebuild it"
            )


@contextlib.contextmanager
def memory_bound(payload_bytes: int):
    """Cap the process's address space while a payload is parsed: a serialized index holds its vectors, so
    parsing it needs about its own size, and a vector length crafted far beyond the file (faiss allocates a
    declared length before it reads) fails as a MemoryError instead of claiming the machine's memory."""
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):  # no /proc: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + max(1 << 30, 4 * payload_bytes)  # room for the index itself, malloc's arenas and a margin
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield  # already as strict
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
