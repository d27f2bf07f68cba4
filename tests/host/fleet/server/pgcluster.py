"""A throwaway PostgreSQL cluster on a free loopback port (tests and ``bench/collector.py``).

Uses Debian's server binaries (``/usr/lib/postgresql/<major>/bin``, installed by
``.ci/install-postgres.sh``): ``initdb`` into a temporary directory, ``pg_ctl start`` with the
socket in that directory and TCP on 127.0.0.1 only, trust authentication for the one role
``edgepack``. PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres``
system user (``runuser``). ``stop()``/``start()`` simulate a database outage.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PgCluster", "find_pg_bin", "start_cluster"]


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, newest major version first."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                    key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                    else 0, reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    exe = shutil.which("initdb")
    if exe and shutil.which("pg_ctl"):
        return Path(os.path.realpath(exe)).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    bindir: Path
    datadir: Path
    port: int
    user: str | None  # the system user running the server (None: this process's user)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.datadir.parent / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://edgepack@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self, *, durable: bool = False) -> PgCluster:
        """``durable``: keep fsync and synchronous commits (benchmarks); tests run without."""
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "edgepack",
                  "--auth=trust", "--encoding=UTF8", "--no-sync", "-N")
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.datadir.parent}'\n"
                    "max_connections = 100\nshared_buffers = 128MB\n")
            if not durable:
                f.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        return self

    def start(self) -> PgCluster:
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log),
                      "-w", "-t", "60", "start", check=False)
        if r.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{tail}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL does not listen on 127.0.0.1:{self.port}")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                  "stop", check=False)

    def fresh_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://edgepack@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_cluster(*, durable: bool = False) -> PgCluster:
    """initdb + start a cluster; raises RuntimeError when the binaries are missing."""
    bindir = find_pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found: run .ci/install-postgres.sh")
    root = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o755)
    datadir = root / "data"
    cluster = PgCluster(bindir=bindir, datadir=datadir, port=_free_port(), user=user)
    return cluster.init(durable=durable).start()
