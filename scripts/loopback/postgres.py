"""A real PostgreSQL server (Debian's `postgresql` package) in a temporary directory, on a free
loopback port, for the tests: initdb, then the `postgres` server itself in the foreground, stopped
by its pid (SIGINT: PostgreSQL's fast shutdown).

PostgreSQL refuses to run as root: as root, the server and initdb run as the `postgres` user the
Debian package creates (`runuser -u postgres`), in a directory of their own under /tmp (a test's
tmp_path is private to root). Authentication is `trust`, on 127.0.0.1 only."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from scripts.loopback.services import free_port

USER = "fleet"  # the server's superuser, in the URLs


def pg_bin(name: str) -> str:
    """Debian keeps the server's programs off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: install Debian's postgresql package (scripts/setup does)")
    return path


class PostgreSQL:
    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self.as_root else list(args)

    @property
    def admin_url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            self._cmd(pg_bin("initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        log = (self.root / "server.log").open("ab")
        server = [pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1"]
        self.proc = subprocess.Popen(
            self._cmd(*server, "-k", str(self.root), "-c", "fsync=off"), stdout=log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    log = (self.root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start: {log}") from None
                time.sleep(0.2)

    def new_database(self) -> str:
        """A database of its own for one test; its URL."""
        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # a name made here
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is None:
            return
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists():  # the server's own pid (runuser's child when run as root)
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
