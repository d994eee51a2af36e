r"""Durable, exclusive output files: loud write failures, fsync, name locks, atomic publication.

flowmc's writers (ensembles in :mod:`flowmc.io.ensemble`, checkpoints in
:mod:`flowmc.io.checkpoint`)
share five rules, implemented once here (standard library only):

* **A failed write is never silent.** :class:`DurableFile` is the binary file that HDF5 writes
  through (h5py's ``fileobj`` driver). It performs every write itself, so no error can be lost
  inside HDF5 or h5py (h5py ignores errors raised while it deallocates a dataset handle, which
  is how a full disk used to go unnoticed). After the first failed write or ``fsync`` the file is
  *sealed*: it records the error, stops touching the disk and keeps later writes in memory only,
  so HDF5 never sees an error (HDF5 2.0 can crash on a handle whose close failed) and nothing
  written after the failure can reach the file. The writer checks :attr:`DurableFile.error`
  before it commits.
* **Committed means on disk.** :meth:`DurableFile.sync` is ``os.fsync`` of the file
  descriptor; writers call it before and after they write their commit record.
* **One writer per output name.** :class:`NameLock` holds an exclusive ``flock`` on a sibling
  file ``.<name>.lock`` for the whole run, so a second writer of the same name (``--force`` or
  ``--resume``) fails at once instead of destroying the first one's data.
* **New files appear complete.** Every file flowmc writes is *published*: written under a
  temporary name ``.<name>.tmp-<pid>`` in the same directory, ``fsync``-ed, renamed over the final
  name (``os.replace``, atomic), followed by ``fsync`` of the directory (:func:`fsync_dir`); on
  any failure before the rename the temporary file is removed and the final name is untouched.
  :func:`publish` is that sequence, the one copy of it: checkpoints
  (:func:`write_atomically`), reports (:func:`flowmc.io.safeio.write_atomic`), the rebuild of an
  ensemble and the join of a sharded one use it as a ``with`` block; a new ensemble, renamed at
  its first commit rather than at the end of a block, uses its steps (:class:`Staged`).
  :func:`check_replaceable` decides whether ``--force`` may replace an existing file: only a
  regular file that the command itself writes (a flowmc ensemble, a flowmc checkpoint), and only
  if no other process holds it.
* **A full disk is found before a commit writes anything.** :meth:`DurableFile.reserve`
  allocates (``posix_fallocate``) generously more than a commit will write before it starts,
  so that ``ENOSPC`` hits there, leaving the file untouched and consistent, and not in the
  middle of HDF5's flush.

Fault injection: tests set :attr:`DurableFile.fault_hook` to a callable ``hook(op, path,
nbytes)`` that is called before every low-level ``"write"``, ``"truncate"``, ``"fsync"`` (of a
file or of a directory), ``"reserve"`` and ``"replace"`` (the rename of a publication) and may
raise ``OSError`` (e.g. ``ENOSPC`` on the k-th write), which is then handled exactly like a real
failure of that system call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

try:  # POSIX; elsewhere (Windows) locking is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "DurableFile",
    "NameLock",
    "Staged",
    "check_replaceable",
    "deferred_sigint",
    "fsync_dir",
    "publish",
    "temp_path",
    "write_atomically",
]

FaultHook = Callable[[str, str, int], None]


def temp_path(path: str) -> str:
    """The temporary name under which a new ``path`` is written: ``.<name>.tmp-<pid>``."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


def lock_path(path: str) -> str:
    """The sibling lock file of ``path``: ``.<name>.lock`` in the same directory."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.lock")


def _hook(op: str, path: str, nbytes: int) -> None:
    hook = DurableFile.fault_hook
    if hook is not None:
        hook(op, path, nbytes)


def fsync_dir(path: str) -> None:
    """``fsync`` the directory that contains ``path`` (makes a rename durable)."""
    head = os.path.dirname(os.path.abspath(path))
    _hook("fsync", head, 0)
    fd = os.open(head, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it.

    Used around a commit, so that an interrupt never lands between writing the data and writing
    the commit record. Outside the main thread (where handlers cannot be set) it does nothing,
    and an ignored SIGINT (a process started by ``nohup`` or as a background job of a shell
    without job control) stays ignored.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    ):
        yield
        return
    pending: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            if callable(old):
                old(signal.SIGINT, pending[0])
            else:  # pragma: no cover - SIG_DFL, or a handler not set from Python
                raise KeyboardInterrupt


# --------------------------------------------------------------------------- files


class DurableFile(io.RawIOBase):
    """A read/write binary file for h5py's ``fileobj`` driver that never loses a write error.

    Opened with an exclusive ``flock`` on the file itself, so HDF5 readers (which take a shared
    lock) report "unable to lock file" while it is open, as with HDF5's own locking.

    Args:
        path: the file.
        create: create it (it must not exist) instead of opening an existing file.

    Attributes:
        error: the first ``OSError`` of a write, truncate or fsync, or ``None``. Once set, the
            file is sealed: later writes go to memory only (and are read back from there).
        n_fsync: number of ``fsync`` calls so far; ``fsync_seconds``: their total duration.

    Raises:
        BlockingIOError: if another process holds the file open (locked).
    """

    #: Test hook ``hook(op, path, nbytes)`` called before every low-level operation
    #: (``op`` in ``"write"``, ``"truncate"``, ``"fsync"``); it may raise ``OSError``.
    fault_hook: ClassVar[FaultHook | None] = None

    def __init__(self, path: str, *, create: bool) -> None:
        super().__init__()
        self.path = path
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self._fd: int | None = os.open(path, flags, 0o644)
        try:
            _flock(self._fd, exclusive=True, what=path)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._pos = 0
        self.error: OSError | None = None
        self._shadow: list[tuple[int, bytes]] = []
        self._shadow_end = 0
        self.n_fsync = 0
        self.fsync_seconds = 0.0
        # HDF5's end of allocated space, as last announced through truncate(); the file is not
        # shrunk to it before trim(), so that space reserved by reserve() stays allocated
        self._eoa = self._high = os.fstat(self._fd).st_size
        self._reserved = 0
        self._can_reserve = hasattr(os, "posix_fallocate")

    # -- io.RawIOBase protocol (what h5py's fileobj driver calls)
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fileno()

    def _fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"I/O operation on closed file {self.path!r}")
        return self._fd

    def _size(self) -> int:
        return max(os.fstat(self._fileno()).st_size, self._shadow_end)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = int(pos)
        elif whence == io.SEEK_CUR:
            self._pos += int(pos)
        elif whence == io.SEEK_END:
            self._pos = self._size() + int(pos)
        else:
            raise ValueError(f"Expected whence 0, 1 or 2; got {whence}")
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        mv = memoryview(buffer).cast("B")
        n = len(mv)
        data = os.pread(self._fileno(), n, self._pos)
        mv[: len(data)] = data
        if len(data) < n:  # beyond the end of the file reads as zeros (like HDF5's sec2 driver)
            mv[len(data) :] = bytes(n - len(data))
        for start, chunk in self._shadow:  # writes made after a failure, in order
            lo, hi = max(start, self._pos), min(start + len(chunk), self._pos + n)
            if lo < hi:
                mv[lo - self._pos : hi - self._pos] = chunk[lo - start : hi - start]
        self._pos += n
        return n

    def write(self, buffer: Any) -> int:
        mv = memoryview(buffer).cast("B")
        n = len(mv)
        if self.error is None:
            try:
                _hook("write", self.path, n)
                done = 0
                while done < n:
                    k = os.pwrite(self._fileno(), mv[done:], self._pos + done)
                    if k <= 0:  # pragma: no cover - pwrite raises instead on Linux
                        raise OSError(errno.EIO, "short write")
                    done += k
            except OSError as e:
                self._fail(e)
            self._high = max(self._high, self._pos + n)
        if self.error is not None:
            self._shadow.append((self._pos, bytes(mv)))
            self._shadow_end = max(self._shadow_end, self._pos + n)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        """Set the file's logical end; the file grows at once but shrinks only at :meth:`trim`."""
        size = self._pos if size is None else int(size)
        if self.error is None:
            self._eoa = size
            try:
                if size > os.fstat(self._fileno()).st_size:
                    _hook("truncate", self.path, size)
                    os.ftruncate(self._fileno(), size)
            except OSError as e:
                self._fail(e)
        return size

    def trim(self) -> None:
        """After HDF5 closed the file: drop unused reserved space beyond its end of allocation.

        The end of allocation is read from the file's own superblock (version 0, as h5py
        writes by default), which HDF5 has just written, so the file is never cut below what
        HDF5 allocated; with any other superblock nothing is trimmed.
        """
        if self.error is not None:
            return
        head = os.pread(self._fileno(), 48, 0)
        if len(head) < 48 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] != 0 or head[13] != 8:
            return
        base, eoa = int.from_bytes(head[24:32], "little"), int.from_bytes(head[40:48], "little")
        end = base + eoa
        if base == 0 and 0 < end < os.fstat(self._fileno()).st_size:
            try:
                _hook("truncate", self.path, end)
                os.ftruncate(self._fileno(), end)
            except OSError as e:
                self._fail(e)

    def reserve(self, nbytes: int) -> None:
        """Allocate disk blocks for the next ``nbytes`` beyond the file's current end.

        Called before a commit with a generous estimate of what it writes, so that a full disk
        shows up here, before anything is written, instead of in the middle of HDF5's flush
        (where a failed write can leave half-updated HDF5 structures). Holes are filled too.
        Does nothing where ``posix_fallocate`` is unsupported.

        Raises:
            OSError: e.g. ``ENOSPC``; the file is unchanged and stays usable.
        """
        if self.error is not None or not self._can_reserve:
            return
        target = max(self._eoa, self._high) + int(nbytes)
        if target <= self._reserved:
            return
        _hook("reserve", self.path, target)
        try:
            os.posix_fallocate(self._fileno(), 0, target)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._can_reserve = False  # e.g. some network file systems
                return
            raise
        self._reserved = target

    def flush(self) -> None:
        """No-op: writes go straight to the OS; durability is :meth:`sync`."""

    # -- durability
    def sync(self) -> None:
        """``os.fsync`` the file (nothing if sealed); a failure seals the file."""
        if self.error is not None:
            return
        t0 = time.perf_counter()
        try:
            _hook("fsync", self.path, 0)
            os.fsync(self._fileno())
        except OSError as e:
            self._fail(e)
        self.n_fsync += 1
        self.fsync_seconds += time.perf_counter() - t0

    def check(self) -> None:
        """Raise (a copy of) the recorded failure, if any."""
        if self.error is not None:
            # a fresh exception: raising the stored one would tie its traceback (and every
            # frame on it) to this object in a reference cycle
            raise OSError(*self.error.args)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc.with_traceback(None)  # no cycle through our own frame

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # also drops the flock
        super().close()


#: errno values of file systems without ``flock`` (some network and parallel file systems)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


def _locks_unsupported(path: str) -> None:
    warnings.warn(
        f"file locking is not supported where {path!r} lives; flowmc cannot stop a second "
        "writer of this output", RuntimeWarning, stacklevel=3,
    )


def _flock(fd: int, *, exclusive: bool, what: str) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BlockingIOError(
            f"{what!r} is open in another process (is a sampler or an analysis still using "
            "it?); wait for it to finish"
        ) from None
    except OSError as e:  # pragma: no cover - depends on the file system
        if e.errno not in _NO_LOCKS:
            raise
        _locks_unsupported(what)


# --------------------------------------------------------------------------- publication


class Staged:
    """A file written under a temporary name next to its final one, until it is published.

    The steps of :func:`publish`, for a writer that needs them apart (an ensemble is renamed at
    its first commit, while it stays open). Creating it removes a temporary file of the same name
    (left by a killed process with our pid; it was never published).

    Args:
        path: the final name.

    Attributes:
        path: the final name.
        temp: the temporary name, ``.<name>.tmp-<pid>`` in the same directory.
        file: the :class:`DurableFile` opened by :meth:`open`, else ``None``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.temp = temp_path(self.path)
        self.file: DurableFile | None = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)

    def open(self) -> DurableFile:
        """Create the temporary file and open it as a :class:`DurableFile`."""
        self.file = DurableFile(self.temp, create=True)
        return self.file

    def sync(self) -> None:
        """``fsync`` the temporary file and close it; raise its first write or sync failure.

        A temporary file written by other means than :meth:`open` (a plot saved by matplotlib)
        is opened for this.
        """
        f = self.file if self.file is not None else DurableFile(self.temp, create=False)
        try:
            f.sync()
            f.check()
        finally:
            f.close()

    def replace(self, verify: Callable[[str], None] | None = None) -> None:
        """Rename the temporary file over the final name (atomic), after ``verify(temp)``.

        ``verify`` may raise to stop the publication (e.g. the final name has become a file that
        may not be replaced); the temporary file is then left for the caller to :meth:`discard`.
        """
        if verify is not None:
            verify(self.temp)
        _hook("replace", self.path, 0)
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        """Close and remove the temporary file (nothing was published); never raises."""
        if self.file is not None:
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


@contextlib.contextmanager
def publish(
    path: str | os.PathLike[str],
    *,
    verify: Callable[[str], None] | None = None,
    best_effort_dir_sync: bool = False,
) -> Iterator[Staged]:
    """Write a file under a temporary name, then give it ``path``: the one publish sequence.

    The block writes :attr:`Staged.temp` (through :meth:`Staged.open`, or by any other means).
    When it ends without an error: the temporary file is ``fsync``-ed and closed,
    ``verify(temp)`` runs (if given), the file is renamed over ``path`` (``os.replace``:
    readers see the old file or the complete new one, never a part, also after a power cut) and
    the directory is ``fsync``-ed (:func:`fsync_dir`). If the block or any step up to the rename
    fails, the temporary file is removed, ``path`` is unchanged, and the error propagates.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> with publish(path) as staged:
        ...     _ = staged.open().write(b"complete")
        >>> with open(path, "rb") as fh:
        ...     fh.read(), os.listdir(os.path.dirname(path))
        (b'complete', ['out.bin'])

    Args:
        path: the final name.
        verify: a last check of the temporary file (or of ``path``) before the rename.
        best_effort_dir_sync: ignore a failure to ``fsync`` the directory (reports: the file is
            complete under its name; only the rename's durability across a power cut is not
            assured). By default such a failure raises, after the rename.

    Raises:
        OSError: from any step (the temporary file is gone; ``path`` is unchanged unless only
            the ``fsync`` of the directory failed).
    """
    staged = Staged(path)
    try:
        yield staged
        staged.sync()
        staged.replace(verify)
    except BaseException:
        staged.discard()
        raise
    if best_effort_dir_sync:
        with contextlib.suppress(OSError):
            fsync_dir(staged.path)
    else:
        fsync_dir(staged.path)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`publish`.

    Readers see the old file or the complete new one, never a part, also after a power cut.

    Raises:
        OSError: if any step fails (the temporary file is removed and ``path`` is unchanged).
    """
    with publish(path) as staged:
        staged.open().write(data)


# --------------------------------------------------------------------------- locks


class NameLock:
    """Exclusive right to write the file ``path``, for one run (a sibling ``.<name>.lock``).

    The lock is an ``flock`` on ``.<name>.lock`` in the same directory; the file holds the
    owner's pid and host and is removed on :meth:`release`. A lock file left by a killed run is
    not locked and is simply taken over. Not re-entrant: a second lock of the same name fails
    even within one process.

    Args:
        path: the output file the lock protects.

    Raises:
        BlockingIOError: (from :meth:`acquire`) if another process holds the lock.
        OSError: if the lock file cannot be created (e.g. a read-only directory).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.lock_path = lock_path(self.path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> NameLock:
        """Take the lock or fail at once; returns ``self``."""
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            return self
        # an output in a folder that does not exist yet: make it (as save_checkpoint does)
        os.makedirs(os.path.dirname(os.path.abspath(self.lock_path)), exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                         0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(fd) from None
            except OSError as e:  # pragma: no cover - depends on the file system
                os.close(fd)
                if e.errno not in _NO_LOCKS:
                    raise
                _locks_unsupported(self.path)
                return self
            except BaseException:
                os.close(fd)
                raise
            # the previous owner may have removed the file between our open and our flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def _busy(self, fd: int) -> BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" ({owner})" if owner else ""
        return BlockingIOError(
            f"{self.path!r} is being written by another flowmc process{who}; wait for it to "
            f"finish or choose another output (lock file {self.lock_path!r})"
        )

    def check_free(self) -> None:
        """Raise ``BlockingIOError`` if another process holds the lock (without taking it)."""
        if fcntl is None or self._fd is not None:  # pragma: no cover
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # no lock file (or none we can open): nobody holds it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(fd) from None
        except OSError:  # pragma: no cover - no locks on this file system
            pass
        os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
        finally:
            os.close(fd)

    def __enter__(self) -> NameLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net only
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        return f"NameLock({self.path!r}, held={self.held})"


# --------------------------------------------------------------------------- replacement policy


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (fifo)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_replaceable(
    path: str,
    *,
    force: bool,
    what: str,
    identify: Callable[[str], str | None],
    resume_hint: bool = True,
    lock_held: bool = False,
) -> bool:
    """Decide whether a writer may (later) replace ``path``; raise if it may not.

    Policy: without ``force`` an existing name is never replaced. With ``force`` only a regular
    file (not a symbolic link, directory, device, fifo or socket) that ``identify`` recognises
    as ``what`` is replaced, and only if no other process holds it open with a lock.

    Args:
        path: the output name.
        force: the user asked to replace an existing file.
        what: what the command writes, for messages ("flowmc ensemble", "flowmc checkpoint").
        identify: ``identify(path)`` returns ``None`` if the regular file ``path`` is a
            ``what``, else a short reason (e.g. "it is not an HDF5 file").
        resume_hint: mention ``--resume`` in the refusal without ``force``.
        lock_held: the caller holds the :class:`NameLock` of ``path`` (else it must be free).

    Returns:
        Whether ``path`` exists (and may be replaced).

    Raises:
        FileExistsError: if ``path`` exists and may not be replaced (the message says why).
        BlockingIOError: if another process writes ``path`` (holds its :class:`NameLock`) or
            holds the file open.
    """
    if not lock_held:
        NameLock(path).check_free()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not force:
        alt = ", or --resume to continue it" if resume_hint else ""
        raise FileExistsError(
            f"Refusing to overwrite existing file {path!r}; pass --force (force=True) to "
            f"replace it{alt}"
        )
    refuse = f"--force refuses to replace {path!r}:"
    if stat.S_ISLNK(st.st_mode):
        raise FileExistsError(
            f"{refuse} it is a symbolic link (to {os.readlink(path)!r}); give the real path "
            "or remove the link"
        )
    if not stat.S_ISREG(st.st_mode):
        raise FileExistsError(f"{refuse} it is {_kind(st.st_mode)}, not a {what} file")
    reason = identify(path)
    if reason is not None:
        raise FileExistsError(
            f"{refuse} {reason}, so it is not a {what}; flowmc only replaces files it wrote "
            "for that purpose (move or delete it yourself)"
        )
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(
                f"{refuse} it is open in another process (a running sampler or analysis?)"
            ) from None
        except OSError as e:  # pragma: no cover - depends on the file system
            if e.errno not in _NO_LOCKS:
                raise
        finally:
            os.close(fd)
    return True
