"""Where the cpu-exact kernels' compiled code is cached, and the one-time compile a new user watches.

numba caches each ``cache=True`` kernel beside its source (``rocmforge/exact/__pycache__``). A non-editable
install may sit in a directory the user cannot write: then the cache goes under ``$ROCMFORGE_HOME/numba``
(``configure()``, run when ``rocmforge.exact`` is first imported, before any kernel is defined).

The first load of a model compiles its kernels (seconds); ``compile_once`` does that up front with one line and a
progress bar on a terminal, and leaves a marker so later loads of a model with the same weight types only load them
(quietly). Then ``release_compiler_pages`` drops LLVM's code from the process's memory: loading the kernels runs
~68 MiB of libllvmlite, which nothing touches again until another kernel is compiled or loaded.

>>> from rocmforge.exact import compile_cache
>>> compile_cache.cache_dir().name in ("__pycache__", "numba")
True
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numba
from numba.core import event

log = logging.getLogger("rocmforge.exact")

PACKAGE_DIR = Path(__file__).parent
MESSAGE = "compiling cpu-exact kernels (once; cached in {})..."


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK)


def cache_dir() -> Path:
    """The directory numba caches the kernels in: the package's ``__pycache__`` when the package directory is
    writable, else ``$ROCMFORGE_HOME/numba`` (``~/.cache/rocmforge/numba``)."""
    in_tree = PACKAGE_DIR / "__pycache__"
    if _writable(in_tree if in_tree.is_dir() else PACKAGE_DIR):
        return in_tree
    from rocmforge.registry import home

    return home() / "numba"


def configure() -> None:
    """Point numba's cache at ``cache_dir()`` when the package directory is not writable (numba's own fallback
    would be a user-wide directory outside ``$ROCMFORGE_HOME``). A ``NUMBA_CACHE_DIR`` the user set wins. Then
    ``skip_blas_probe()``."""
    directory = cache_dir()
    if directory.name == "numba" and not numba.config.CACHE_DIR:
        directory.mkdir(parents=True, exist_ok=True)
        numba.config.CACHE_DIR = str(directory)
    skip_blas_probe()


def skip_blas_probe() -> None:
    """Import ``numba.np.arraymath`` (which numba imports before it compiles or loads its first kernel) with its
    BLAS probe failing: the probe imports ``scipy.linalg`` and scipy's own OpenBLAS, ~17 MiB resident, only to
    learn whether ``np.dot`` may be compiled, and no kernel here calls BLAS. Nothing changes when scipy's BLAS
    is already loaded (the probe then finds it)."""
    probe = "scipy.linalg.cython_blas"
    if probe in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules[probe] = None  # an import of it fails (ImportError) without importing scipy.linalg first
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules[probe]


def _marker(key: Iterable[str]) -> Path:
    # the kernels' sources, the backend files whose arguments pick their compiled signatures, and numba's version
    # are part of the key: an upgrade compiles (and shows it) again
    sources = sorted(PACKAGE_DIR.glob("*.py")) + sorted((PACKAGE_DIR.parent / "backends").glob("exact*.py"))
    digest = hashlib.sha256("\n".join([numba.__version__, *key, *(f"{p.name}:{p.stat().st_mtime_ns}:"
                                                                     f"{p.stat().st_size}" for p in sources)])
                            .encode()).hexdigest()[:16]
    directory = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else cache_dir()
    return directory / f"rocmforge-warm-{digest}"


class _Progress(event.Listener):
    """A numba compile-event listener: counts the rocmforge.exact kernels compiled while it is installed."""

    def __init__(self):
        self.count, self.bar = 0, None

    def on_start(self, ev: event.Event) -> None:
        pass

    def on_end(self, ev: event.Event) -> None:
        if ev.data["dispatcher"].py_func.__module__.startswith("rocmforge.exact"):
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)


def compile_once(key: Iterable[str], run: Callable[[], object], show: bool | None = None) -> int:
    """Run ``run`` (a few forward steps that call every kernel a model needs, so numba compiles them or loads them
    from its cache now, not during the first request); returns how many kernels were compiled. The first call
    with a ``key`` (e.g. the model's weight types) and these kernel sources prints, when ``show`` (default:
    stderr is a terminal), one line and a progress bar; later ones are quiet."""
    marker = _marker(key)
    if marker.exists():
        run()  # loads the cached kernels: ~0.4 s that the first request would otherwise pay
        return 0
    show = sys.stderr.isatty() if show is None else show
    progress = _Progress()
    if show:
        from tqdm import tqdm

        print(MESSAGE.format(marker.parent), file=sys.stderr, flush=True)
        progress.bar = tqdm(desc="kernels", unit=" kernel", file=sys.stderr, leave=False)
    try:
        with event.install_listener("numba:compile", progress):
            run()
    finally:
        if progress.bar is not None:
            progress.bar.close()
    if progress.count:
        log.info("compiled %d cpu-exact kernels into %s", progress.count, marker.parent)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return progress.count


_MADV_DONTNEED = 4  # Linux: a private file mapping forgets its pages, and reads them again on the next touch
_LIBC = ctypes.CDLL(None, use_errno=True)


def drop_file_pages(start: int, stop: int) -> bool:
    """Make this process forget the resident pages of ``[start, stop)`` (page-aligned addresses) of a read-only
    file mapping (``madvise(MADV_DONTNEED)``; a later read faults them back in). Never call it on memory the
    process wrote: those pages would be zeroed or revert to the file. Returns whether the kernel took it."""
    return _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED) == 0


class _Mapping(NamedTuple):
    start: int
    stop: int
    writable: bool
    resident_kib: int
    anonymous_kib: int  # pages the process wrote (copied on write): not the file's


def _compiler_mappings() -> list[_Mapping]:
    """The mappings of llvmlite's library (LLVM) in this process, from ``/proc/self/smaps`` (none without it)."""
    from llvmlite.binding import ffi

    library = os.path.realpath(Path(ffi.__file__).with_name(ffi.get_library_name()))
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return []
    mappings, current = [], None
    for line in lines:
        fields = line.split(maxsplit=5)
        if not fields[0].endswith(":"):  # a mapping's first line: address range, permissions, ..., path
            current = None
            if len(fields) > 5 and os.path.realpath(fields[5].strip()) == library:
                start, stop = (int(address, 16) for address in fields[0].split("-"))
                current = {"start": start, "stop": stop, "writable": "w" in fields[1]}
        elif current is not None and fields[0] == "Rss:":
            current["resident_kib"] = int(fields[1])
        elif current is not None and fields[0] == "Anonymous:":  # after Rss: in each mapping's lines
            mappings.append(_Mapping(**current, anonymous_kib=int(fields[1])))
    return mappings


def compiler_resident_kib() -> int:
    """KiB of llvmlite's library (LLVM) resident in this process (0 without ``/proc``).

    >>> compiler_resident_kib() >= 0
    True
    """
    return sum(m.resident_kib for m in _compiler_mappings())


def release_compiler_pages() -> int:
    """Drop the resident pages of llvmlite's library (LLVM's code, ~68 MiB once a model's kernels are loaded) from
    this process: nothing runs that code again until numba compiles or loads another kernel, which then faults
    what it needs back in from the page cache. Only mappings the process cannot write and never did (no
    anonymous, copied-on-write page, as the loader leaves in relocated read-only data), whose pages are the
    file's. Returns the bytes dropped (0 without ``/proc``).

    >>> release_compiler_pages() >= 0
    True
    """
    return sum(m.stop - m.start for m in _compiler_mappings()
               if not m.writable and m.anonymous_kib == 0 and drop_file_pages(m.start, m.stop))
