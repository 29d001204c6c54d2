"""A throwaway PostgreSQL server on loopback, from Debian's `postgresql` package: for the shared-queue tests, the
`bench/serve.py --workers` benchmark, and trying several workers on one machine. Not for production.

    with local_postgres() as url:   # postgresql://postgres@127.0.0.1:PORT/postgres
        ...

The cluster lives in a new folder under the system's temp folder, removed afterwards. initdb refuses to run as
root, so as root the server runs as the `postgres` user the package creates (which owns that folder).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin(name: str) -> str:
    """The path of a PostgreSQL server program (initdb, pg_ctl): on PATH, or under /usr/lib/postgresql/*/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (scripts/install_system_deps.sh)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_postgres():
    """Start a new PostgreSQL cluster, yield its URL, stop and remove it after."""
    root = Path(tempfile.mkdtemp(prefix="reverie-pg-"))
    data = root / "pgdata"
    run_as = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    try:
        _run(run_as + [pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        _run(run_as + [pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w",
                       "-t", "60", "start"])
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _wait(url)
        yield url
    finally:
        subprocess.run(run_as + [pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def _wait(url: str, timeout: float = 30.0) -> None:
    import psycopg

    end = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
