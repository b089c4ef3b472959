"""Atomic writes: every file and directory distil writes appears complete or not at all; and owner-file locks.

A writer that crashes or is killed leaves only a hidden `.<name>.tmp-*` sibling, never a half-written file
or directory that a later stage (or a resumed run) would take as complete. A lock is a file recording its
owner (pid, host, start), created atomically; one whose owner is gone is taken over, so a killed run never
blocks the next (labelling's shard claims and finalise lock, training's run directory lock).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distil.utils.errors import InputError, one_line_errors

COMPLETE_MARKER = ".distil_complete.json"  # written last into a directory built by `build_directory`


STALE_AFTER_S = 60  # a temporary untouched this long whose writer is gone is a leftover of a killed run


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return True


def _owner() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})


def live_owner(lock: Path, stale_after_s: float = 600) -> dict | None:
    """The live process holding `lock` (an owner file: pid, host, started), with its age, or None. A lock whose
    owner is gone (a killed run on this host, or untouched for `stale_after_s` from another host) does not
    count."""
    try:
        owner = json.loads(lock.read_text() or "{}")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except ValueError:  # being written this instant
        owner, age = {}, 0.0
    if owner.get("host") == socket.gethostname():
        if not pid_alive(int(owner["pid"])):
            return None
    elif age > stale_after_s:
        return None
    return {**owner, "age_s": age, "lock": str(lock)}


def take_lock(lock: Path, stale_after_s: float = 600) -> bool:
    """Create the owner file `lock` atomically; a lock whose owner is gone is taken over. False: held."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if live_owner(lock, stale_after_s) is not None:
                return False
            lock.unlink(missing_ok=True)  # its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner())
        return True


class LockHeldError(InputError):
    """A lock (an owner file) that a live process holds; `owner` is what `live_owner` read from it."""

    def __init__(self, owner: dict):
        self.owner = owner
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", time.time())))
        super().__init__(
            f"{owner['lock']} is held by pid {owner.get('pid')} on {owner.get('host')} since {since}"
        )


@contextmanager
def hold_lock(lock: str | Path, heartbeat_s: float = 30, stale_after_s: float = 120) -> Iterator[Path]:
    """Hold the owner file `lock` for the duration of the block, or raise `LockHeldError` naming its live owner.

    For a lock held as long as a whole run: a thread touches it every `heartbeat_s`, so another host sees it
    as live; untouched for `stale_after_s` (the owner died there), or with its pid gone on this host, it is
    taken over. Removed when the block ends, also by an exception."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while not take_lock(lock, stale_after_s):
        if (owner := live_owner(lock, stale_after_s)) is not None:
            raise LockHeldError(owner)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(heartbeat_s):
            try:
                os.utime(lock)
            except FileNotFoundError:
                return

    beat = threading.Thread(target=heartbeat, name=f"lock {lock.name}", daemon=True)
    beat.start()
    try:
        yield lock
    finally:
        done.set()
        lock.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporaries (`.<name>.tmp-<pid>...`) that killed writers of `path` left beside it: their
    process is gone (on this host) and they were not touched for `STALE_AFTER_S`. Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(f".{path.name}.tmp-") :].split("-")[0]
        try:
            stale = not pid_alive(int(pid)) and time.time() - tmp.stat().st_mtime > STALE_AFTER_S
        except (ValueError, FileNotFoundError):
            continue
        if stale:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` (os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _follow_umask(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; shared outputs should follow the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


@contextmanager
def atomic_directory(
    out_dir: str | Path, keep_existing: Callable[[], bool] = lambda: False
) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; on success it replaces `out_dir`.

    `keep_existing()` is asked once the build is done: True keeps an `out_dir` that appeared meanwhile (another
    process finished the same build first) and drops the temporary copy.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        if out_dir.exists():
            if keep_existing():
                shutil.rmtree(tmp)
                return
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(directory: str | Path, spec: dict | None = None) -> bool:
    """True iff `directory` was fully written by `build_directory` and, when given, for the same `spec`."""
    marker = Path(directory) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if spec is None:
        return True
    try:
        return json.loads(marker.read_text()).get("spec") == spec
    except (OSError, json.JSONDecodeError):
        return False


def build_directory(
    final_dir: str | Path, spec: dict, build: Callable[[Path], Any], replace: bool = False
) -> Path:
    """Run `build(tmp_dir)`, write the completeness marker (with `spec`) last, then move it to `final_dir`.

    An incomplete or stale `final_dir` is replaced; a complete one for the same `spec` only when `replace`
    (otherwise it was written concurrently and is kept).
    """
    final_dir = Path(final_dir)
    with atomic_directory(
        final_dir, keep_existing=lambda: not replace and is_complete(final_dir, spec)
    ) as tmp:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"spec": spec}, indent=2, sort_keys=True) + "\n")
    return final_dir


class OutputNotWritableError(InputError):
    """An output directory that cannot be created or written."""


def ensure_writable_directory(path: str | Path, key: str) -> Path:
    """Create `path` (config key `key`) if needed and check it is writable: found before any model loads."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise OutputNotWritableError(
            f"{key}={directory} is a file, not a directory; choose a directory ({key}=...)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputNotWritableError(
            f"cannot create {key}={directory} ({err.strerror}); choose a writable location ({key}=...)"
        ) from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"{key}={directory} is not writable by this user; choose a writable location ({key}=...)"
        )
    return directory


def ensure_writable_parent(path: str | Path, key: str) -> Path:
    """`path` (config key `key`) will be written as a whole (a temporary sibling renamed into place): its parent
    must exist or be creatable, and be writable. Checked before any model loads."""
    path = Path(path).expanduser()
    try:
        ensure_writable_directory(path.parent, key)
    except OutputNotWritableError as err:
        raise OutputNotWritableError(f"{key}={path} cannot be written: {err}") from err
    return path


class OutOfSpaceError(InputError):
    """A write that ran out of disk space: the message names the path and the space left."""


def is_out_of_space(err: BaseException) -> bool:
    """An exception that means the disk (or quota) is full: ENOSPC/EDQUOT, or torch.save's zip writer
    (inline_container.cc), which reports a short write as a RuntimeError ("unexpected pos", "file write
    failed"), or safetensors' Rust error text ("No space left on device")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if isinstance(err, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        return True
    return "No space left on device" in text or "os error 28" in text


def free_megabytes(path: str | Path) -> float:
    """Free space (MB) on the file system of `path`, or of its nearest existing parent."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e6


@contextmanager
def reporting_full_disk(path: str | Path) -> Iterator[None]:
    """Turn a full-disk failure while writing `path` into one line that says so (the temporary the writer had
    started is already gone: atomic_file and atomic_directory remove it)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, OutOfSpaceError) or not is_out_of_space(err):
            raise
        raise OutOfSpaceError(
            f"no space left on device writing {path} ({free_megabytes(path):.0f} MB free): free space, or write "
            "elsewhere (out_dir=..., or DISTIL_HOME=... / paths.root=...)"
        ) from err


def writable_home(command: Callable[..., Any]) -> Callable[..., Any]:
    """Outside a command's `hydra.main`: Hydra creates the run directory under `DISTIL_HOME` before the command's
    body runs, so an unwritable home (a file, a read-only mount) would end in Hydra's traceback. Checked first,
    it is one line and exit status 1. (`paths.root=` on the command line is Hydra's to create.)"""
    import functools

    from distil.utils.paths import distil_home

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        one_line_errors(ensure_writable_directory)(distil_home(), "DISTIL_HOME")
        return command(*args, **kwargs)

    return wrapper
