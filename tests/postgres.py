"""A throwaway PostgreSQL server on a Unix socket in a temp dir, for tests and benchmarks.

``initdb`` refuses to run as root (CI runs as root), so as root the server runs as an unprivileged
user (``nobody``, or ``postgres`` when the Debian package made it) through ``runuser``. Nothing
listens on TCP; the data dir and socket are deleted on exit.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (Debian's versioned folder, or the PATH)."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").is_file() and Path(folder, "pg_ctl").is_file():
            return Path(folder)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _server_user() -> str | None:
    """The user the server runs as: None (this user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root with no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextmanager
def throwaway_postgres(database: str = "postgres"):
    """Yield a SQLAlchemy URL (psycopg 3) of a fresh server; stop and delete it afterwards."""
    folder = postgres_bin()
    if folder is None:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    data, socket_dir = root / "data", root / "socket"
    socket_dir.mkdir()
    os.chmod(root, 0o755)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    prefix = ["runuser", "-u", user, "--"] if user is not None else []
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*args, check=True):
        return subprocess.run(
            [*prefix, *args], env=env, capture_output=True, text=True, check=check, timeout=120
        )

    try:
        run(
            str(folder / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-N",
            "-E",
            "UTF8",
        )
        options = f"-c listen_addresses='' -k {socket_dir} -c max_connections=100 -c fsync=off"
        run(
            str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
            "-w", "start",
        )  # fmt: skip
        yield f"postgresql+psycopg://postgres@/{database}?host={socket_dir}"
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").is_file() else ""
        raise RuntimeError(f"PostgreSQL failed: {exc.stderr or exc.stdout}\n{log}") from exc
    finally:
        if data.is_dir():
            run(str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
