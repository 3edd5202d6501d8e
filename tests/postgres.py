"""A throwaway PostgreSQL cluster for the test session: Debian's binaries, a temporary folder.

``start_cluster()`` runs ``initdb`` into a new temporary folder and starts ``postgres`` on
127.0.0.1 at a free port (its unix socket in the same folder). PostgreSQL refuses to run as
root, so under root the folder is handed to ``nobody`` and both run as that user
(``runuser``). Password authentication over TCP (scram-sha-256) for the superuser
``batchspec``, so the tests can also try a wrong password. ``Cluster.stop()`` stops the server
and removes the folder. ``Cluster.new_database()`` creates an empty database and returns its
URL (with the password: tests only). ``Cluster.frozen()`` stops every process of the server
(``SIGSTOP``) for a block and resumes them after it: the kernel still accepts and ACKs, nothing
answers.

Settings favour speed over durability (``fsync=off``): the data is thrown away.

The server outlives whatever ends the test process (``pg_ctl`` starts it in a session of its
own): a ``timeout 60 pytest`` (SIGTERM, to pytest and its xdist workers alike), a SIGKILL, a
crash. So each cluster has a watchdog (``_start_watchdog``): a small process in a session of
its own (no signal sent to pytest's process group reaches it) that holds the read end of a
pipe whose only write end the test process holds. When that process ends, however it ends,
the kernel closes the write end; the watchdog reads end of file, stops the server
(``pg_ctl stop -m immediate``, after resuming a server ``frozen()`` left stopped) and removes
the folder. ``Cluster.stop()`` closes the pipe itself once it has stopped the server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "batchspec"
PASSWORD = "pw-" + secrets.token_hex(8)


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with ``initdb`` (Debian's layout), or PATH's."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    bin_dir: Path
    base: Path
    port: int
    as_user: list[str] = field(default_factory=list)
    _admin: object | None = None
    _tests: object | None = None
    #: stops the server and removes ``base`` once this process ends (``_start_watchdog``)
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, *args],
            cwd=self.base,
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def admin(self):  # type: ignore[no-untyped-def]
        """An autocommit connection to the ``postgres`` database (for CREATE DATABASE)."""
        import psycopg

        if self._admin is None:
            self._admin = psycopg.connect(self.url(), autocommit=True)
        return self._admin

    def new_schema(self) -> str:
        """A new, empty schema in the ``tests`` database; a URL whose search path is it."""
        name = "s_" + secrets.token_hex(6)
        self.tests_db().execute(f"CREATE SCHEMA {name}")  # type: ignore[attr-defined]
        return self.url("tests") + f"?options=-csearch_path%3D{name}"

    def drop_schema(self, url: str) -> None:
        name = url.rsplit("%3D", 1)[-1]
        with contextlib.suppress(Exception):
            self.tests_db().execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # type: ignore[attr-defined]

    def tests_db(self):  # type: ignore[no-untyped-def]
        """An autocommit connection to the ``tests`` database (made on first use)."""
        import psycopg

        if self._tests is None:
            self.admin().execute("CREATE DATABASE tests")  # type: ignore[attr-defined]
            self._tests = psycopg.connect(self.url("tests"), autocommit=True)
        return self._tests

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = "t_" + secrets.token_hex(6)
        self.admin().execute(f"CREATE DATABASE {name}")  # type: ignore[attr-defined]
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        with contextlib.suppress(Exception):
            self.admin().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (postmaster first, so it forks nothing new),
        resumed when the block ends, however it ends."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        stopped = [postmaster]
        try:
            os.kill(postmaster, signal.SIGSTOP)
            children = subprocess.run(
                ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
            ).stdout.split()
            for pid in map(int, children):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        for conn in (self._tests, self._admin):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[attr-defined]
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
        if self.watchdog is not None:  # nothing left for it to do: it reads EOF and exits
            assert self.watchdog.stdin is not None
            self.watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watchdog.wait(timeout=10)


def _start_watchdog(bin_dir: Path, base: Path, as_user: list[str]) -> subprocess.Popen[bytes]:
    """A process that stops the cluster in ``base`` once this one ends (module docstring)."""
    return subprocess.Popen(
        [sys.executable, __file__, "watch", str(bin_dir), str(base), *as_user],
        stdin=subprocess.PIPE,  # its write end: ours alone (close_fds, O_CLOEXEC)
        start_new_session=True,  # out of pytest's process group: `timeout` signals that
    )


def _watch(bin_dir: Path, base: Path, as_user: list[str]) -> None:
    """The watchdog: wait for end of file on stdin, then stop the server and remove ``base``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns once every write end is closed: its owner has ended
    data = base / "data"
    for _ in range(2):  # again after a moment: a server that was still starting
        if not (data / "postmaster.pid").exists():
            break
        _resume(data)
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            cwd=base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    shutil.rmtree(base, ignore_errors=True)


def _resume(data: Path) -> None:
    """SIGCONT to the server's processes (``Cluster.frozen()`` may have stopped them)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
        ).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def start_cluster(bin_dir: Path) -> Cluster:
    """initdb into a temporary folder and start the server; stopped by ``Cluster.stop()``."""
    base = Path(tempfile.mkdtemp(prefix="batchspec-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres will not run as root
        shutil.chown(base, "nobody", "nogroup" if _group_exists("nogroup") else "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    cluster = Cluster(bin_dir=bin_dir, base=base, port=_free_port(), as_user=as_user)
    cluster.watchdog = _start_watchdog(bin_dir, base, as_user)  # before anything is started
    pwfile = base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        shutil.chown(pwfile, "nobody")
    try:
        cluster._run(
            str(bin_dir / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        options = (
            f"-p {cluster.port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        cluster._run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(cluster.data),
            "-o",
            options,
            "-l",
            str(base / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
    except subprocess.CalledProcessError as err:
        log = base / "server.log"
        detail = (err.stdout or b"").decode(errors="replace")
        if log.exists():
            detail += log.read_text(errors="replace")
        cluster.stop()
        raise RuntimeError(f"could not start a PostgreSQL test cluster: {detail[-2000:]}") from err
    _wait_ready(cluster)
    return cluster


def _wait_ready(cluster: Cluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    _watch(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
