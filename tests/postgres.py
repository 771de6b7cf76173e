"""A real PostgreSQL server for the tests: Debian's package, started in a temporary directory.

CI runs as root and `pg_ctl` refuses root, so as root the server runs as the unprivileged
`postgres` user (`runuser`), in a directory that user owns; as anyone else it runs as that user.
It listens on 127.0.0.1 on a free port, with password (SCRAM) authentication for the `headswap`
superuser: the tests pass the password in PGPASSWORD, as a Secret would, never in the DSN.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "s3cret-test-pw"  # the tests check that it never appears in a log or an error


def bindir() -> Path:
    """Where initdb and pg_ctl are (Debian keeps them per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: `python3 dev.py test` installs Debian's postgresql package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    directory: Path
    port: int
    user: str = "headswap"
    database: str = "headswap"

    @property
    def dsn(self) -> str:
        """No password: it comes from PGPASSWORD (see `env`)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": PASSWORD}

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(bindir() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "-w", "stop", check=False)

    def connect(self):
        import psycopg

        return psycopg.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres", password=PASSWORD,
                               autocommit=True)

    def create_database(self, name: str) -> str:
        """A fresh database on this server; returns its DSN (no password)."""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"


def start_postgres() -> PostgresServer:
    """initdb + pg_ctl start in a new temporary directory (about 1 s)."""
    directory = Path(tempfile.mkdtemp(prefix="headswap-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    os.chmod(directory, 0o700)
    server = PostgresServer(directory, free_port())
    password_file = directory / "password"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(password_file, "postgres", "postgres")
    server._run("initdb", "-D", str(directory / "data"), "-U", server.user, "--auth=scram-sha-256",
                f"--pwfile={password_file}", "-E", "UTF8", "--locale=C")
    server.start()
    with server.connect() as conn:
        conn.execute(f'CREATE DATABASE "{server.database}"')
    return server


def remove(server: PostgresServer) -> None:
    server.stop("immediate")
    for _ in range(20):
        try:
            shutil.rmtree(server.directory)
            return
        except OSError:
            time.sleep(0.1)
