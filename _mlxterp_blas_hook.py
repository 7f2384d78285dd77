"""Start-up hook: make mlx's CPU back end use OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~50x slower for float32
matmuls). If an OpenBLAS that exports unprefixed ``cblas_sgemm`` is loaded
with RTLD_GLOBAL *before* mlx's shared library is loaded, the dynamic linker
binds mlx's BLAS calls to OpenBLAS instead; loading it afterwards changes
nothing (Python loads extensions with RTLD_NOW, so the binding is made when mlx
is imported). Users often ``import mlx.core`` before ``import mlxterp``, so this
module is imported at interpreter start by ``mlxterp_blas.pth`` (installed into
site-packages with mlxterp) and arranges the preload for whenever mlx is first
imported.

It lives outside the ``mlxterp`` package on purpose: importing
``mlxterp.anything`` would run ``mlxterp/__init__.py`` (and import mlx) at
every interpreter start. For the same reason it uses only ``os`` and ``sys`` at
import time and ``ctypes`` only once mlx is being imported. The public API is
in ``mlxterp.blas``; this module also holds the state that API reports.

Set ``MLXTERP_NO_BLAS=1`` to disable it, ``MLXTERP_BLAS=/path/to/lib.so`` to
choose the library.
"""

import os
import sys

DISABLE_ENV = "MLXTERP_NO_BLAS"
PATH_ENV = "MLXTERP_BLAS"
# The symbol mlx's CPU matmul calls; a library must export it unprefixed
# (numpy's bundled scipy-openblas only has prefixed names, so it can't help).
SGEMM_SYMBOL = "cblas_sgemm"
OPENBLAS_SONAME = "libopenblas.so.0"

# Filled in by preload(); read by mlxterp.blas.blas_status().
preloaded_path = None
preload_error = None
preload_attempted = False


def disabled():
    """True when the user opted out with MLXTERP_NO_BLAS (any value but '' or '0')."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def supported_platform():
    """Only Linux needs this: macOS mlx uses Accelerate."""
    return sys.platform.startswith("linux")


def candidate_paths():
    """Libraries to try, best first; only the override when MLXTERP_BLAS is set.

    Absolute paths are distribution locations; the bare soname at the end lets
    the dynamic linker search LD_LIBRARY_PATH and the ld.so cache (no
    subprocess, unlike ``ldconfig -p``).
    """
    override = os.environ.get(PATH_ENV, "")
    if override:
        # An explicit choice is never silently replaced by another library.
        return [override]
    triplet = getattr(sys.implementation, "_multiarch", "") or f"{os.uname().machine}-linux-gnu"
    debian = f"/usr/lib/{triplet}"
    return [
        # Debian/Ubuntu: libopenblas0-pthread, -openmp, -serial. pthread first:
        # the OpenMP build can clash with another OpenMP runtime in the process.
        f"{debian}/openblas-pthread/{OPENBLAS_SONAME}",
        f"{debian}/openblas-openmp/{OPENBLAS_SONAME}",
        f"{debian}/openblas-serial/{OPENBLAS_SONAME}",
        f"{debian}/{OPENBLAS_SONAME}",  # update-alternatives link
        "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL openblas-threads
        f"/usr/lib64/{OPENBLAS_SONAME}",
        f"/usr/lib/{OPENBLAS_SONAME}",  # Arch
        f"/usr/local/lib/{OPENBLAS_SONAME}",  # built from source
        OPENBLAS_SONAME,
    ]


def file_at(address):
    """Path of the loaded file that contains `address` (dladdr), or None."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    info = DlInfo()
    if not _libdl().dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _libdl():
    """The library exporting dladdr: libc on glibc >= 2.34, else libdl."""
    import ctypes

    process = ctypes.CDLL(None)
    if hasattr(process, "dladdr"):
        return process
    return ctypes.CDLL("libdl.so.2")


def load_global(path):
    """Load `path` RTLD_GLOBAL if it exports unprefixed cblas_sgemm.

    Returns (real path, None) on success or (None, reason) on failure.
    """
    import ctypes

    if os.sep in path and not os.path.exists(path):
        return None, f"{path}: no such file"
    try:
        # Load locally first so a library without the symbol never enters the
        # global namespace (where it could capture other libraries' symbols).
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        if not hasattr(lib, SGEMM_SYMBOL):
            return None, f"{path}: does not export unprefixed {SGEMM_SYMBOL}"
        # Report the file that defines it: a bare soname resolves to a path.
        address = ctypes.cast(getattr(lib, SGEMM_SYMBOL), ctypes.c_void_p).value
        provider = file_at(address) or path
        # Promote the already-loaded library to the global namespace.
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError as error:  # dlopen failed: missing, wrong arch, broken deps
        return None, f"{path}: {error}"
    return provider, None


def preload():
    """Load OpenBLAS RTLD_GLOBAL so mlx binds to it; return its path or None.

    Does nothing (and records why) when disabled, on other platforms, when no
    suitable library is found, or when mlx is already imported (too late then).
    Safe to call more than once.
    """
    global preloaded_path, preload_error, preload_attempted
    if preloaded_path or preload_attempted:
        return preloaded_path
    if not supported_platform():
        return None
    if disabled():
        preload_error = f"disabled by {DISABLE_ENV}"
        return None
    if "mlx" in sys.modules:
        preload_error = "mlx was imported before the preload could run"
        return None
    preload_attempted = True
    explicit = bool(os.environ.get(PATH_ENV))
    reasons = []
    for path in candidate_paths():
        if not explicit and os.sep in path and not os.path.exists(path):
            continue  # most default locations are absent; not worth reporting
        loaded, reason = load_global(path)
        if loaded:
            preloaded_path = loaded
            preload_error = None
            return loaded
        if explicit or os.sep in path:  # a missing bare soname is just "not found"
            reasons.append(reason)
    preload_error = "; ".join(reasons) or "no OpenBLAS library found"
    return None


class PreloadBeforeMlx:
    """Import hook that runs preload() just before `mlx` is first imported.

    Preloading lazily keeps interpreter start cheap for the many Python
    processes that never touch mlx (loading OpenBLAS costs ~15 ms and starts
    its thread pool).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mlx":
            uninstall()
            preload()
        return None  # let the normal finders import the module


_finder = PreloadBeforeMlx()


def install():
    """Arrange for preload() to run before mlx is imported (no-op if not needed)."""
    global preload_error
    if not supported_platform() or disabled():
        return
    if "mlx" in sys.modules:
        if not preloaded_path:
            preload_error = "mlx was imported before the preload could run"
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall():
    """Remove the import hook (it only needs to fire once)."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def hook_pending():
    """True while the import hook waits for mlx to be imported."""
    return _finder in sys.meta_path


install()
