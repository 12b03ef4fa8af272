"""A private PostgreSQL cluster for tests: initdb + pg_ctl in a temporary folder.

The server listens on 127.0.0.1 only, on a free port, with `trust` authentication (nothing
but this machine's loopback can reach it). `initdb` refuses to run as root, so under root
the cluster belongs to the `postgres` user (Debian's package creates it) and its commands
run through `runuser`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator


def _bin_dir() -> pathlib.Path | None:
    found = shutil.which("initdb")
    if found:
        return pathlib.Path(found).resolve().parent
    # Debian keeps the server binaries off PATH.
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if (pathlib.Path(d) / "initdb").exists():
            return pathlib.Path(d)
    return None


def unavailable() -> str | None:
    """Why no cluster can be started here, or None if one can."""
    if _bin_dir() is None:
        return "PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no PostgreSQL driver (pip install -e '.[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no `postgres` user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and no `runuser` to start the server as `postgres`"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A running cluster; `new_database()` gives a fresh `postgresql://` URL per test."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.port = _free_port()
        self.bin = _bin_dir()
        assert self.bin is not None
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        data = self.root / "data"
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.root} -c max_connections=200 -c fsync=off"
        )
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.root / "log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """Start a private cluster; stop it and delete its folder afterwards."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="mobisearch-pg-"))
    c = Cluster(root)
    try:
        c.start()
        # Wait until it accepts connections on the port, not only on the socket.
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", c.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
