"""Which BLAS mlx's CPU back end uses on Linux, and how to make it OpenBLAS.

The Linux ``mlx[cpu]`` wheel links a reference BLAS: a float32 1024^3 matmul
takes ~400 ms instead of ~15 ms with OpenBLAS. An OpenBLAS loaded RTLD_GLOBAL
*before* mlx's shared library wins the dynamic linker's symbol lookup; loaded
later it changes nothing. mlxterp therefore installs a start-up hook
(``mlxterp_blas.pth`` importing the top-level ``_mlxterp_blas_hook`` module)
that preloads OpenBLAS just before mlx is first imported, whatever the import
order in user code.

Public API:

- ``find_openblas()``: an OpenBLAS on disk that exports ``cblas_sgemm``, or None.
- ``preload()``: load it RTLD_GLOBAL now (only useful before mlx is imported).
- ``blas_status()``: a ``BlasStatus`` saying which library actually serves
  mlx's ``cblas_sgemm`` in this process, and the fix when it is not optimized.
- ``warn_if_slow()``: warn once (``SlowBlasWarning``) when mlx already runs on
  its reference BLAS and a fix exists.

Environment: ``MLXTERP_NO_BLAS=1`` disables the hook and the warning;
``MLXTERP_BLAS=/path/to/libopenblas.so.0`` picks the library (and nothing else).
On macOS mlx uses Accelerate and all of this is a no-op.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import json
import mmap
import os
import shutil
import site
import struct
import subprocess
import sys
import urllib.parse
import warnings

from mlxterp.errors import SlowBlasWarning

# Recorded before importing the hook: if it is already imported, the .pth ran it
# at interpreter start (nothing else in mlxterp imports it earlier).
_HOOK_RAN_AT_STARTUP = "_mlxterp_blas_hook" in sys.modules


def _import_hook():
    """Import the hook module, which is installed next to the mlxterp package.

    An editable install made before the hook existed does not map it; load it
    from the source tree then rather than breaking ``import mlxterp``.
    """
    try:
        import _mlxterp_blas_hook
    except ModuleNotFoundError as error:
        if error.name != "_mlxterp_blas_hook":
            raise
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_mlxterp_blas_hook.py")
        spec = importlib.util.spec_from_file_location("_mlxterp_blas_hook", path)
        if spec is None or not os.path.exists(path):
            raise
        _mlxterp_blas_hook = importlib.util.module_from_spec(spec)
        sys.modules["_mlxterp_blas_hook"] = _mlxterp_blas_hook
        spec.loader.exec_module(_mlxterp_blas_hook)
    return _mlxterp_blas_hook


_hook = _import_hook()

PTH_NAME = "mlxterp_blas.pth"
APT_PACKAGE = "libopenblas0-pthread"
DISABLE_ENV = _hook.DISABLE_ENV
PATH_ENV = _hook.PATH_ENV

# Symbols that identify an optimized BLAS in the library serving cblas_sgemm.
_OPTIMIZED_MARKERS = {
    "openblas": "openblas_get_config",
    "mkl": "MKL_Get_Version",
    "blis": "bli_info_get_version_str",
}


_KIND_NAMES = {
    "openblas": "OpenBLAS",
    "mkl": "MKL",
    "blis": "BLIS",
    "reference": "the slow reference BLAS",
    "unknown": "an unrecognized BLAS",
}


@dataclasses.dataclass(frozen=True)
class BlasStatus:
    """Which BLAS mlx's CPU back end uses in this process.

    optimized: True/False once mlx is imported; None before that (see detail)
        or on platforms that are not checked.
    library: the file that serves mlx's cblas_sgemm calls (None before mlx is
        imported, or when it could not be determined).
    kind: "openblas", "mkl", "blis", "accelerate", "reference" or "unknown".
    preloaded: the library mlxterp's hook loaded before mlx, if any.
    available: an OpenBLAS on disk that the hook can use, if any.
    hook_installed: mlxterp_blas.pth is in a site-packages directory.
    hook_ran_at_startup: the .pth ran when this interpreter started.
    disabled: MLXTERP_NO_BLAS is set.
    detail: one sentence for humans.
    fix: one line that makes mlx use OpenBLAS, or None when nothing to fix.
    """

    platform: str
    mlx_imported: bool
    optimized: bool | None
    library: str | None
    kind: str | None
    preloaded: str | None
    available: str | None
    hook_installed: bool
    hook_ran_at_startup: bool
    disabled: bool
    detail: str
    fix: str | None

    def as_dict(self) -> dict:
        """The status as a plain dict (for JSON output)."""
        return dataclasses.asdict(self)


def find_openblas() -> str | None:
    """Return the path of the OpenBLAS that the start-up hook would use, or None.

    Honours ``MLXTERP_BLAS`` (and then looks nowhere else). Otherwise tries the
    Debian/Ubuntu multiarch locations of libopenblas0-pthread, -openmp and
    -serial, Fedora/Arch/local paths, then ``ldconfig -p``. A library counts
    only if its ELF dynamic symbol table exports unprefixed ``cblas_sgemm``
    for this machine's architecture; nothing is loaded.
    """
    if not _hook.supported_platform():
        return None
    for candidate in _hook.candidate_paths():
        path = candidate if os.sep in candidate else _ldconfig_lookup(candidate)
        if path and os.path.exists(path) and _exports_sgemm(path):
            return path
    return None


def preload() -> str | None:
    """Load OpenBLAS RTLD_GLOBAL so that mlx, imported afterwards, uses it.

    Returns the loaded library's path, or None (disabled, not Linux, nothing
    suitable found, or mlx already imported: then it is too late and nothing is
    loaded). The start-up hook calls this automatically just before mlx is
    first imported; call it yourself only if the hook cannot run.
    """
    return _hook.preload()


def blas_status() -> BlasStatus:
    """Report which BLAS serves mlx's matmuls in this process.

    On Linux with mlx imported, this reads the import slot (GOT entry) of
    ``cblas_sgemm`` in mlx's shared library and asks the dynamic linker
    (dladdr) which loaded file it points into, so it reports what is actually
    in effect rather than what was attempted. It never imports mlx itself and
    runs no computation.

    It raises nothing: an unreadable library list reports the BLAS as unknown.
    """
    mlx_imported = "mlx.core" in sys.modules
    if sys.platform == "darwin":
        return _status(
            mlx_imported=mlx_imported, optimized=True, kind="accelerate",
            detail="macOS: mlx uses Apple Accelerate; nothing to do.",
        )
    if not _hook.supported_platform():
        return _status(mlx_imported=mlx_imported, detail=f"BLAS is not checked on {sys.platform}.")

    available = find_openblas()
    if not mlx_imported:
        if _hook.preloaded_path or (_hook.hook_pending() and available):
            library = _hook.preloaded_path or available
            return _status(
                available=available,
                detail=f"mlx is not imported yet; it will use OpenBLAS ({library}).",
            )
        return _status(
            available=available,
            detail="mlx is not imported yet; it will use its reference BLAS.",
            fix=_fix(available),
        )

    library = _sgemm_provider()
    if library is None:
        # Could not read mlx's import slot (unusual build): trust a preload
        # that happened before mlx, otherwise claim nothing.
        optimized = True if _hook.preloaded_path else None
        kind = "openblas" if optimized else "unknown"
        detail = "Could not inspect mlx's cblas_sgemm binding; inferred from the preload."
    else:
        kind = _library_kind(library)
        # An unrecognized library is not flagged: better silent than a false alarm.
        optimized = None if kind == "unknown" else kind != "reference"
        detail = f"mlx's cblas_sgemm is served by {_KIND_NAMES[kind]} ({library})."
        if optimized is False and _hook.preload_error:
            detail += f" Preload: {_hook.preload_error}."
    return _status(
        mlx_imported=True, optimized=optimized, library=library, kind=kind,
        available=available, detail=detail, fix=_fix(available) if optimized is False else None,
    )


_warned = False


def warn_if_slow() -> bool:
    """Warn once per process if mlx runs on its reference BLAS and a fix exists.

    Only on Linux, only when mlx is already imported and computes on the CPU by
    default (on a GPU the CPU's BLAS hardly matters), not when MLXTERP_NO_BLAS
    is set, and only when an OpenBLAS is on disk or installable with apt-get.
    The ``SlowBlasWarning`` names the exact fix. Returns True if it warned.
    """
    global _warned
    if _warned or not _hook.supported_platform() or _hook.disabled():
        return False
    if "mlx.core" not in sys.modules:
        return False  # the hook (installed by importing this module) will preload
    if sys.modules["mlx.core"].default_device().type != sys.modules["mlx.core"].DeviceType.cpu:
        return False
    status = blas_status()
    if status.optimized is not False:
        return False
    if not status.available and not shutil.which("apt-get"):
        return False  # nothing we can point the user to
    _warned = True
    warnings.warn(
        f"mlx is using the reference BLAS ({status.library}): float32 "
        f"matmuls are ~25-60x slower than with OpenBLAS. Fix: {status.fix}",
        SlowBlasWarning,
        stacklevel=2,
    )
    return True


def _status(
    *, detail, mlx_imported=False, optimized=None, library=None, kind=None,
    available=None, fix=None,
) -> BlasStatus:
    """A BlasStatus with the hook's state filled in."""
    return BlasStatus(
        platform=sys.platform,
        mlx_imported=mlx_imported,
        optimized=optimized,
        library=library,
        kind=kind,
        preloaded=_hook.preloaded_path,
        available=available,
        hook_installed=_pth_installed(),
        hook_ran_at_startup=_HOOK_RAN_AT_STARTUP,
        disabled=_hook.disabled(),
        detail=detail,
        fix=fix,
    )


def _fix(available: str | None) -> str:
    """One line that gets mlx onto OpenBLAS from the current situation."""
    if _hook.disabled():
        return f"unset {DISABLE_ENV} and restart Python"
    example = f"/usr/lib/{_multiarch()}/openblas-pthread/libopenblas.so.0"
    if os.environ.get(PATH_ENV) and not available:
        return f"point {PATH_ENV} at an OpenBLAS exporting cblas_sgemm (e.g. {example}) or unset it"
    if available and _pth_installed():
        # The hook is installed but mlx was loaded before it ran (python -S, a
        # .pth that imports mlx earlier, mlxterp run from a PYTHONPATH copy).
        return f"start Python with LD_PRELOAD={available}"
    steps = []
    if not available:
        if shutil.which("apt-get"):
            sudo = "" if os.geteuid() == 0 else "sudo "
            steps.append(f"{sudo}apt-get install -y {APT_PACKAGE}")
        else:
            steps.append(
                "install OpenBLAS (e.g. 'dnf install openblas-threads' or "
                f"'pacman -S openblas') or set {PATH_ENV}={example}"
            )
    if not _pth_installed():
        reinstall = _reinstall_command()
        steps.append(f"reinstall mlxterp to get its start-up hook: {reinstall}" if reinstall else
                     # Not installed by pip (PYTHONPATH, pip --target): no start-up hook can run.
                     "import mlxterp before mlx in your program (its import hook loads OpenBLAS "
                     "first)")
    fix = "; then ".join(steps) + "; then restart Python"
    if available:
        fix += f" (or start Python with LD_PRELOAD={available})"
    return fix


def _reinstall_command() -> str | None:
    """The pip command that (re)installs mlxterp with its .pth hook the way it was installed,
    or None where pip did not install it (a PYTHONPATH entry or a `pip --target` folder, whose
    .pth files Python never reads)."""
    pip = f"{sys.executable} -m pip install"
    # Only an installation in a site directory counts (a source tree on
    # sys.path may hold a stray mlxterp.egg-info).
    site_dirs = {os.path.realpath(d) for d in _site_directories()}
    installed = [
        dist for dist in importlib.metadata.distributions(name="mlxterp")
        if os.path.realpath(str(dist.locate_file(""))) in site_dirs
    ]
    if installed:
        direct_url = installed[0].read_text("direct_url.json")
        if not direct_url:  # from a package index
            return f"{pip} --force-reinstall --no-deps mlxterp"
        info = json.loads(direct_url)
        source = info["url"]  # a local wheel, folder or VCS URL: install from it again
        if "vcs_info" in info:
            commit = info["vcs_info"].get("commit_id")
            source = f"{info['vcs_info']['vcs']}+{source}" + (f"@{commit}" if commit else "")
        elif source.startswith("file://"):
            source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
        if info.get("dir_info", {}).get("editable"):
            return f"{pip} --no-deps -e {source}"
        return f"{pip} --force-reinstall --no-deps {source}"
    # Not installed by pip: a source tree on sys.path can be; a copy without one cannot.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "pyproject.toml")):
        return f"{pip} -e {root}"
    return None


def _site_directories() -> list[str]:
    """The directories whose .pth files Python processes at start-up."""
    directories = list(getattr(site, "getsitepackages", list)())
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    return directories


def _pth_installed() -> bool:
    """True if mlxterp_blas.pth sits in a directory that site processes."""
    return any(os.path.exists(os.path.join(d, PTH_NAME)) for d in _site_directories())


def _multiarch() -> str:
    return getattr(sys.implementation, "_multiarch", "") or f"{os.uname().machine}-linux-gnu"


def _ldconfig_lookup(soname: str) -> str | None:
    """Path of `soname` in the ld.so cache, via ``ldconfig -p``; None if absent."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listing.splitlines():
        # "\tlibopenblas.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblas.so.0"
        name, _, path = line.strip().partition(" => ")
        if name.split(" ")[0] == soname and _exports_sgemm(path):
            return path  # several entries may exist (other ABIs); take one we can load
    return None


# --- ELF reading: which symbols a library exports, where it imports from ---

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_SHT_RELA = 4
_SHT_DYNSYM = 11
# Relocations whose target is a plain pointer to the symbol (GOT entries):
# x86-64 GLOB_DAT, JUMP_SLOT; aarch64 GLOB_DAT, JUMP_SLOT.
_POINTER_RELOCATIONS = {6, 7, 1025, 1026}


def _elf_symbol_info(path: str, symbol: str) -> tuple[int, bool, list[int]] | None:
    """Read `symbol` from the ELF file's dynamic tables.

    Returns (machine, exported, import_slot_offsets) or None when the file is
    not a 64-bit little-endian ELF we can parse. The slot offsets are relative
    to the library's load address.
    """
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan_elf(data, symbol.encode())
    except (OSError, ValueError, struct.error):
        return None


def _scan_elf(data, name: bytes) -> tuple[int, bool, list[int]] | None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # ELF64, little-endian
        return None
    header = _ELF_HEADER.unpack_from(data)
    machine, section_offset, section_size, section_count = (
        header[2], header[6], header[11], header[12],
    )
    sections = [
        _SECTION_HEADER.unpack_from(data, section_offset + i * section_size)
        for i in range(section_count)
    ]
    dynsym = next((i for i, s in enumerate(sections) if s[1] == _SHT_DYNSYM), None)
    if dynsym is None:
        return machine, False, []
    _, _, _, _, sym_offset, sym_size, strtab_index, _, _, _ = sections[dynsym]
    strtab_offset, strtab_size = sections[strtab_index][4], sections[strtab_index][5]
    strtab = data[strtab_offset : strtab_offset + strtab_size]
    # String offsets at which the name appears (st_name may point into a longer
    # string whose tail is our name).
    name_offsets = set()
    start = strtab.find(name + b"\0")
    while start != -1:
        name_offsets.add(start)
        start = strtab.find(name + b"\0", start + 1)
    exported = False
    indices = set()
    for index, (st_name, _, _, st_shndx, _, _) in enumerate(
        _SYMBOL.iter_unpack(data[sym_offset : sym_offset + sym_size])
    ):
        if st_name in name_offsets:
            indices.add(index)
            exported = exported or st_shndx != 0  # 0 = undefined (an import)
    slots = []
    for section in sections:
        if section[1] == _SHT_RELA and section[6] == dynsym and indices:
            offset, size = section[4], section[5]
            for r_offset, r_info, _ in _RELA.iter_unpack(data[offset : offset + size]):
                if r_info >> 32 in indices and r_info & 0xFFFFFFFF in _POINTER_RELOCATIONS:
                    slots.append(r_offset)
    return machine, exported, slots


def _exports_sgemm(path: str) -> bool:
    """True if `path` exports unprefixed cblas_sgemm for this machine's architecture."""
    info = _elf_symbol_info(path, _hook.SGEMM_SYMBOL)
    return bool(info and info[1] and info[0] == _own_machine())


def _own_machine() -> int | None:
    """e_machine of the running interpreter (x86-64: 62, aarch64: 183)."""
    try:
        with open("/proc/self/exe", "rb") as file:
            header = file.read(_ELF_HEADER.size)
        return _ELF_HEADER.unpack(header)[2]
    except (OSError, struct.error):
        return None


# --- asking the dynamic linker what is loaded and what is bound ---


class _PhdrInfo(ctypes.Structure):
    # Leading fields of struct dl_phdr_info; the rest is not needed.
    _fields_ = [("dlpi_addr", ctypes.c_size_t), ("dlpi_name", ctypes.c_char_p)]


_PHDR_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p
)


def loaded_libraries() -> list[tuple[str, int]]:
    """(path, load address) of every shared object in this process, in load order."""
    objects = []

    def collect(info, _size, _data):
        name = info.contents.dlpi_name
        if name:
            objects.append((os.fsdecode(name), info.contents.dlpi_addr))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(_PHDR_CALLBACK(collect), None)
    return objects


def _sgemm_provider() -> str | None:
    """The file that mlx's cblas_sgemm calls go to, or None if undeterminable.

    Finds the mlx library that imports cblas_sgemm, reads the pointer in its
    import slot (GOT) and asks dladdr which file that pointer is in.
    """
    for path, base in loaded_libraries():
        if not (os.path.basename(path).startswith("libmlx") or f"{os.sep}mlx{os.sep}" in path):
            continue  # only mlx's own libraries matter (the mlx package dir or libmlx*)
        info = _elf_symbol_info(path, _hook.SGEMM_SYMBOL)
        if not info or not info[2]:
            continue
        # Python loads extension modules with RTLD_NOW, so the slot is bound
        # as soon as mlx is imported (which is also why a later OpenBLAS load
        # cannot change it).
        target = _hook.file_at(ctypes.c_void_p.from_address(base + info[2][0]).value or 0)
        if target is None or os.path.samefile(target, path):
            return None  # still points into mlx's own PLT: lazily bound, not yet called
        return os.path.normpath(target)
    return None


def _library_kind(path: str) -> str:
    """Classify the library serving cblas_sgemm by the symbols it exports."""
    try:
        library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)  # already loaded
    except OSError:
        return "unknown"
    for kind, marker in _OPTIMIZED_MARKERS.items():
        if hasattr(library, marker):
            return kind
    if "mlx_cpu.libs" in path or os.path.basename(path).startswith("libblas"):
        return "reference"
    return "unknown"
