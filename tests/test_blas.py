"""mlxterp.blas and the OpenBLAS start-up hook.

The BLAS is fixed when mlx's shared library is loaded, so most tests run a
fresh interpreter. Those scripts start with ``import _mlxterp_blas_hook`` (what
mlxterp_blas.pth does at interpreter start; a no-op when the .pth already ran)
and then import mlx *before* mlxterp, the order the hook exists for. The
dynamic linker's own account (LD_DEBUG=bindings) is the ground truth that
blas_status() is checked against. No test looks at wall-clock times.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest

from mlxterp import blas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")
OPENBLAS = blas.find_openblas() if LINUX else None

linux_only = pytest.mark.skipif(not LINUX, reason="the reference-BLAS problem is Linux-only")
needs_openblas = pytest.mark.skipif(
    OPENBLAS is None,
    reason="no OpenBLAS exporting cblas_sgemm found (apt-get install libopenblas0-pthread)",
)

# Prints blas_status() as JSON, plus the error of a CPU matmul against numpy.
STATUS_SCRIPT = """
import json
import _mlxterp_blas_hook  # as mlxterp_blas.pth does at interpreter start
import mlx.core as mx      # mlx first, then mlxterp
import numpy as np
from mlxterp import blas

a = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((64, 80)).astype(np.float32)
product = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
error = float(np.abs(product - a.astype(np.float64) @ b.astype(np.float64)).max())
print(json.dumps({**blas.blas_status().as_dict(), "matmul_error": error}))
"""


def run_python(code: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the repo on sys.path and clean BLAS settings."""
    full_env = {k: v for k, v in os.environ.items() if k not in (blas.DISABLE_ENV, blas.PATH_ENV)}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env, capture_output=True, text=True, timeout=300, check=False, **kwargs,
    )
    assert result.returncode == 0, result.stderr
    return result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def sgemm_binding(debug_prefix: str) -> str:
    """The file ld.so bound mlx's cblas_sgemm to, from LD_DEBUG=bindings output."""
    pattern = re.compile(
        r"binding file (\S*mlx\S*) \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'"
    )
    for path in glob.glob(debug_prefix + ".*"):
        with open(path, errors="replace") as log:
            for line in log:
                match = pattern.search(line)
                if match:
                    return match.group(2)
    raise AssertionError("ld.so reported no binding of cblas_sgemm for mlx")


@linux_only
@needs_openblas
def test_hook_makes_mlx_use_openblas_even_when_mlx_is_imported_first(tmp_path):
    debug = str(tmp_path / "ld")
    env = {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": debug}
    status = last_json(run_python(STATUS_SCRIPT, env))
    assert status["optimized"] is True
    assert status["kind"] == "openblas"
    assert status["fix"] is None
    assert status["preloaded"] and os.path.samefile(status["library"], status["preloaded"])
    # What blas_status() read from mlx's import slot is what ld.so really bound.
    assert os.path.samefile(status["library"], sgemm_binding(debug))
    assert status["matmul_error"] < 1e-3


@linux_only
def test_opt_out_reports_reference_blas_as_bound_by_the_linker(tmp_path):
    debug = str(tmp_path / "ld")
    status = last_json(run_python(
        STATUS_SCRIPT,
        {"MLXTERP_NO_BLAS": "1", "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": debug},
    ))
    assert status["optimized"] is False
    assert status["kind"] == "reference"
    assert status["preloaded"] is None
    assert status["disabled"] is True
    assert "MLXTERP_NO_BLAS" in status["fix"]
    assert os.path.samefile(status["library"], sgemm_binding(debug))
    assert status["matmul_error"] < 1e-3


@linux_only
def test_missing_library_breaks_nothing_and_status_gives_the_fix():
    missing = "/nonexistent/libopenblas.so.0"
    status = last_json(run_python(STATUS_SCRIPT, {"MLXTERP_BLAS": missing}))
    assert status["matmul_error"] < 1e-3  # mlx still works, on its reference BLAS
    assert status["optimized"] is False
    assert status["kind"] == "reference"
    assert status["available"] is None and status["preloaded"] is None
    assert f"{missing}: no such file" in status["detail"]
    assert "MLXTERP_BLAS" in status["fix"]


@linux_only
def test_no_openblas_on_the_machine_suggests_the_apt_package():
    if not shutil.which("apt-get"):
        pytest.skip("the apt-get fix is only offered where apt-get exists")
    # Pretend nothing is installed: the hook looks in one empty place only.
    script = STATUS_SCRIPT.replace(
        "import mlx.core as mx ",
        "_mlxterp_blas_hook.candidate_paths = lambda: ['/nonexistent/libopenblas.so.0']\n"
        "import mlx.core as mx ",
    )
    status = last_json(run_python(script))
    assert status["matmul_error"] < 1e-3
    assert status["optimized"] is False and status["available"] is None
    assert "apt-get install -y libopenblas0-pthread" in status["fix"]


@linux_only
@needs_openblas
def test_bare_soname_override_resolves_to_a_path():
    status = last_json(run_python(STATUS_SCRIPT, {"MLXTERP_BLAS": "libopenblas.so.0"}))
    assert status["optimized"] is True
    assert os.path.isabs(status["preloaded"])
    assert os.path.samefile(status["preloaded"], status["library"])


@linux_only
def test_library_without_cblas_sgemm_is_refused():
    libm = next(path for path, _ in blas.loaded_libraries() if "/libm.so" in path)
    status = last_json(run_python(STATUS_SCRIPT, {"MLXTERP_BLAS": libm}))
    assert status["optimized"] is False
    assert "does not export unprefixed cblas_sgemm" in status["detail"]
    assert status["matmul_error"] < 1e-3


@linux_only
@needs_openblas
def test_lapack_still_correct_with_openblas_preloaded():
    # OpenBLAS also exports LAPACK symbols, which then serve mlx's linalg too.
    result = run_python("""
        import json
        import _mlxterp_blas_hook
        import mlx.core as mx
        import numpy as np
        a = np.eye(64, dtype=np.float32) * 4 + np.random.default_rng(0).random((64, 64), np.float32)
        inverse = np.array(mx.linalg.inv(mx.array(a), stream=mx.cpu))
        print(json.dumps(float(np.abs(a @ inverse - np.eye(64)).max())))
        print(json.dumps(_mlxterp_blas_hook.preloaded_path))
    """)
    error, preloaded = (json.loads(line) for line in result.stdout.split())
    assert preloaded is not None
    assert error < 1e-3


WARN_SCRIPT = """
import json, warnings
import _mlxterp_blas_hook as hook
{prepare}
import mlx.core
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from mlxterp import blas  # mlxterp/__init__ may call warn_if_slow() itself
    blas.warn_if_slow()
    blas.warn_if_slow()
slow = [str(w.message) for w in caught if issubclass(w.category, blas.SlowBlasWarning)]
print(json.dumps({{"warnings": slow, "fix": blas.blas_status().fix}}))
"""


@linux_only
def test_warns_once_with_the_fix_when_mlx_was_loaded_before_the_hook():
    if OPENBLAS is None and not shutil.which("apt-get"):
        pytest.skip("no OpenBLAS and no apt-get: nothing to suggest, so no warning expected")
    # uninstall(): as if the hook had not run before mlx was imported.
    result = last_json(run_python(WARN_SCRIPT.format(prepare="hook.uninstall()")))
    assert len(result["warnings"]) == 1
    assert result["fix"] and result["fix"] in result["warnings"][0]
    if OPENBLAS is None:
        assert "apt-get install -y libopenblas0-pthread" in result["fix"]
    else:
        assert f"LD_PRELOAD={OPENBLAS}" in result["fix"] or "pip install" in result["fix"]


@linux_only
@needs_openblas
def test_no_warning_when_openblas_is_in_use():
    result = last_json(run_python(WARN_SCRIPT.format(prepare="")))
    assert result["warnings"] == [] and result["fix"] is None


@linux_only
def test_no_warning_when_opted_out():
    result = last_json(run_python(WARN_SCRIPT.format(prepare=""), {"MLXTERP_NO_BLAS": "1"}))
    assert result["warnings"] == []


@linux_only
def test_hook_is_cheap_and_lazy():
    # At interpreter start the hook may not import ctypes, mlx or numpy, nor load OpenBLAS.
    result = run_python("""
        import json, sys
        import _mlxterp_blas_hook as hook
        heavy = [m for m in ("ctypes", "mlx", "numpy") if m in sys.modules]
        maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
        before = "openblas" in maps
        import mlx.core
        after = "openblas" in open("/proc/self/maps").read() if maps else False
        print(json.dumps({"heavy": heavy, "before": before, "after": after,
                          "preloaded": hook.preloaded_path}))
    """)
    state = last_json(result)
    assert state["heavy"] == []
    assert state["before"] is False
    if OPENBLAS is not None:
        assert state["after"] is True and state["preloaded"]


@linux_only
@needs_openblas
def test_installed_pth_hook_runs_at_interpreter_start():
    if not blas._pth_installed():
        pytest.skip(f"{blas.PTH_NAME} not in site-packages: reinstall with pip install -e .")
    # No explicit hook import and no PYTHONPATH: only the installed .pth can help.
    env = {k: v for k, v in os.environ.items() if k not in (blas.DISABLE_ENV, blas.PATH_ENV)}
    env.pop("PYTHONPATH", None)
    code = ("import json, mlx.core; from mlxterp import blas; "
            "print(json.dumps(blas.blas_status().as_dict()))")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                            text=True, timeout=300, check=True)
    status = last_json(result)
    assert status["hook_ran_at_startup"] is True
    assert status["optimized"] is True and status["kind"] == "openblas"


@linux_only
def test_find_openblas_honours_override(monkeypatch):
    monkeypatch.setenv(blas.PATH_ENV, "/nonexistent/libopenblas.so.0")
    assert blas.find_openblas() is None
    if OPENBLAS is not None:
        monkeypatch.setenv(blas.PATH_ENV, OPENBLAS)
        assert blas.find_openblas() == OPENBLAS


@linux_only
def test_export_check_reads_the_elf_symbol_table():
    libm = next(path for path, _ in blas.loaded_libraries() if "/libm.so" in path)
    assert not blas._exports_sgemm(libm)
    if OPENBLAS is not None:
        assert blas._exports_sgemm(OPENBLAS)


def test_noop_on_macos(monkeypatch):
    import _mlxterp_blas_hook as hook

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(sys, "meta_path", [m for m in sys.meta_path if m is not hook._finder])
    monkeypatch.setattr(hook, "preloaded_path", None)
    monkeypatch.setattr(hook, "preload_attempted", False)
    assert blas.preload() is None
    hook.install()
    assert hook._finder not in sys.meta_path
    status = blas.blas_status()
    assert status.optimized is True and status.kind == "accelerate" and status.fix is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert blas.warn_if_slow() is False


def test_wheel_ships_the_pth_and_the_hook_module(tmp_path):
    # pip builds the wheel with the project's own build backend (pyproject.toml).
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = glob.glob(str(tmp_path / "mlxterp-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read(blas.PTH_NAME).decode() == "import _mlxterp_blas_hook\n"
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert "_mlxterp_blas_hook.py" in names and "mlxterp/blas.py" in names
    # Listed in RECORD, so `pip uninstall` removes it.
    assert f"{blas.PTH_NAME}," in record


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_puts_pth_in_site_packages_and_uninstall_removes_it(tmp_path, editable):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")

    def pip(*args):
        subprocess.run([python, "-m", "pip", "-q", *args], check=True, timeout=600,
                       capture_output=True)

    import mlx.core as mx

    pip("install", f"mlx[cpu]=={mx.__version__}")
    pip("install", "--no-deps", *(["-e", ROOT] if editable else [ROOT]))
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    pth = os.path.join(site_packages, blas.PTH_NAME)
    assert os.path.exists(pth)

    env = {k: v for k, v in os.environ.items() if k not in (blas.DISABLE_ENV, blas.PATH_ENV)}
    env.pop("PYTHONPATH", None)
    code = ("import json, mlx.core, _mlxterp_blas_hook as h; "
            "print(json.dumps(h.preloaded_path))")
    preloaded = json.loads(subprocess.run([python, "-c", code], env=env, cwd="/", check=True,
                                          capture_output=True, text=True).stdout)
    if OPENBLAS is not None:
        assert preloaded and os.path.samefile(preloaded, OPENBLAS)

    pip("uninstall", "-y", "mlxterp")
    assert not os.path.exists(pth)


@linux_only
def test_no_warning_when_mlx_computes_on_a_gpu():
    if OPENBLAS is None and not shutil.which("apt-get"):
        pytest.skip("no OpenBLAS and no apt-get: no warning expected anyway")
    # The reference BLAS is bound (the hook did not run first), but the default device is a GPU.
    prepare = "hook.uninstall()\nimport mlx.core as mx\nmx.default_device = lambda: mx.Device(mx.gpu)"
    result = last_json(run_python(WARN_SCRIPT.format(prepare=prepare)))
    assert result["warnings"] == []
    assert result["fix"]  # the status still says what would fix the CPU's BLAS


class _Installed:
    """An installed distribution as importlib.metadata gives it: a folder and direct_url.json."""

    def __init__(self, folder: str, direct_url: dict | None):
        self.folder, self.direct_url = folder, direct_url

    def locate_file(self, name):
        return self.folder

    def read_text(self, name):
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.mark.parametrize("direct_url, expected", [
    (None, "--force-reinstall --no-deps mlxterp"),
    ({"url": "file:///tmp/dist/mlxterp-0.1.0-py3-none-any.whl", "archive_info": {}},
     "--force-reinstall --no-deps /tmp/dist/mlxterp-0.1.0-py3-none-any.whl"),
    ({"url": "file:///src/mlx%20terp", "dir_info": {"editable": True}}, "--no-deps -e /src/mlx terp"),
    ({"url": "https://github.com/o/mlxterp", "vcs_info": {"vcs": "git", "commit_id": "abc"}},
     "--force-reinstall --no-deps git+https://github.com/o/mlxterp@abc"),
])
def test_reinstall_command_installs_from_where_mlxterp_came(monkeypatch, tmp_path, direct_url, expected):
    from mlxterp import blas

    monkeypatch.setattr(blas, "_site_directories", lambda: [str(tmp_path)])
    monkeypatch.setattr(blas.importlib.metadata, "distributions",
                        lambda name: [_Installed(str(tmp_path), direct_url)])
    assert blas._reinstall_command() == f"{sys.executable} -m pip install {expected}"


def test_fix_for_a_copy_pip_did_not_install_imports_mlxterp_first(monkeypatch, tmp_path):
    from mlxterp import blas

    # pip --target or a copied folder: no site directory holds it, and no source tree is above it.
    monkeypatch.setattr(blas, "_site_directories", lambda: [])
    monkeypatch.setattr(blas, "__file__", str(tmp_path / "mlxterp" / "blas.py"))
    monkeypatch.setattr(blas, "_pth_installed", lambda: False)
    monkeypatch.delenv("MLXTERP_NO_BLAS", raising=False)
    monkeypatch.delenv("MLXTERP_BLAS", raising=False)
    assert blas._reinstall_command() is None
    fix = blas._fix("/usr/lib/libopenblas.so.0")
    assert "import mlxterp before mlx" in fix and "LD_PRELOAD=/usr/lib/libopenblas.so.0" in fix
    assert "pip install" not in fix
