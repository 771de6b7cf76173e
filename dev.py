#!/usr/bin/env python3
"""Set up the development environment, then serve or test. Needs only Python 3.11 and pip.

    python3 dev.py serve [serve flags...]   # .venv + install + protobuf code, then `headswap serve`
    python3 dev.py test  [pytest args...]   # same set-up, then the test suite
    python3 dev.py perf_analyzer [args...]  # Triton's perf_analyzer (from the tritonclient wheel)

The install is repeated only when pyproject.toml, setup.py or protos/ change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".headswap-install"
EXTRAS = {"serve": "train", "test": "train,s3,test", "perf_analyzer": "train,s3,test"}
# perf_analyzer's shared libraries that pip does not provide: unpacked from Debian's package
PERF_LIBS = VENV / "lib" / "perf_analyzer"
LIBB64 = "libb64.so.0d"
# The `kserve` package's REST client is tested unchanged (tests/test_rest.py); kserve pins protobuf 6,
# so it lives in a venv of its own beside .venv.
KSERVE_VENV = ROOT / ".venv-kserve"
KSERVE = "kserve==0.21.0"


def inputs_digest(extras: str) -> str:
    digest = hashlib.sha256(extras.encode())
    for path in [ROOT / "pyproject.toml", ROOT / "setup.py", *sorted((ROOT / "protos").rglob("*.proto"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def setup(extras: str) -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = inputs_digest(extras)
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    print(f"installing headswap[{extras}] into {VENV} (generates the protobuf code)", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "--quiet", "--upgrade", "pip", "setuptools<81", "wheel"], check=True)
    subprocess.run([*pip, "--editable", f".[{extras}]"], check=True, cwd=ROOT)
    STAMP.write_text(wanted)


def ensure_perf_analyzer_libs() -> None:
    """perf_analyzer links libb64.so.0d (Debian's libb64-0d): unpack it into the venv when the
    system lacks it, with `apt-get download` + `dpkg -x`, which need no root."""
    if (PERF_LIBS / LIBB64).exists() or LIBB64 in subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True).stdout:
        return
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        print(f"perf_analyzer needs {LIBB64} (package libb64-0d); install it with the system's "
              "package manager", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(["apt-get", "download", "libb64-0d"], cwd=tmp, capture_output=True, text=True)
        if download.returncode != 0:
            print(f"could not download libb64-0d for perf_analyzer (run apt-get update?):\n{download.stderr}",
                  file=sys.stderr)
            return
        (deb,) = Path(tmp).glob("libb64-0d_*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        (library,) = (Path(tmp) / "root").rglob(LIBB64)
        PERF_LIBS.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, PERF_LIBS / LIBB64)
    print(f"unpacked {LIBB64} into {PERF_LIBS} for perf_analyzer", flush=True)


def perf_analyzer_env(python: Path = PYTHON) -> dict[str, str]:
    """The environment perf_analyzer runs in: libb64 and the pip wheel's libcudart on the library path."""
    cudart = subprocess.run([str(python), "-c", "import nvidia.cuda_runtime as m; print(m.__path__[0])"],
                            capture_output=True, text=True).stdout.strip()
    paths = [str(PERF_LIBS), *([f"{cudart}/lib"] if cudart else []), os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}


def ensure_postgresql() -> None:
    """The job-store tests run a real PostgreSQL server (tests/postgres.py): install Debian's
    package when its binaries are missing (as root, as CI runs; otherwise say how)."""
    import glob

    if glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("the tests need PostgreSQL's server binaries: install Debian's `postgresql` package",
              file=sys.stderr)
        return
    print("installing Debian's postgresql package for the job-store tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True, env=env)


def ensure_kserve_client() -> None:
    """The venv with the kserve package that tests/test_rest.py runs its REST client in."""
    stamp = KSERVE_VENV / ".complete"
    if stamp.exists() and stamp.read_text() == KSERVE:
        return
    print(f"installing {KSERVE} into {KSERVE_VENV.name} (its REST client is tested against ours)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(KSERVE_VENV)
    subprocess.run([str(KSERVE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", KSERVE], check=True)
    stamp.write_text(KSERVE)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    extras = os.environ.get("HEADSWAP_EXTRAS", EXTRAS[command])
    setup(extras)
    env = dict(os.environ)
    if command != "serve":
        ensure_perf_analyzer_libs()
    if command == "test":
        ensure_postgresql()
        ensure_kserve_client()
    if command == "serve":
        args = [str(PYTHON), "-m", "headswap.cli", "serve", *rest]
    elif command == "perf_analyzer":
        args, env = [str(VENV / "bin" / "perf_analyzer"), *rest], perf_analyzer_env()
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    os.chdir(ROOT)
    os.execve(args[0], args, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
