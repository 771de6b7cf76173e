#!/usr/bin/env python3
"""Set up the development environment, then serve or test. Needs only Python 3.11 and pip.

    python3 dev.py serve [serve flags...]   # .venv + install + protobuf code, then `headswap serve`
    python3 dev.py test  [pytest args...]   # same set-up, then the test suite

The install is repeated only when pyproject.toml, setup.py or protos/ change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".headswap-install"
EXTRAS = {"serve": "train", "test": "train,s3,test"}


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


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    extras = os.environ.get("HEADSWAP_EXTRAS", EXTRAS[command])
    setup(extras)
    if command == "serve":
        args = [str(PYTHON), "-m", "headswap.cli", "serve", *rest]
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    os.chdir(ROOT)
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
