"""The embedded PostgreSQL of `chatlog serve` without DATABASE_URL (the pgserver package).

pgserver starts `postgres` as a daemon (pg_ctl start) and keeps the pids of the
processes using it in `pgdata/.handle_pids.json`; the last one to exit stops
it. A `chatlog serve` killed with SIGKILL never removes its pid, so without
the clean-up below every later owner would think another still uses the
server, and nobody would ever stop it again.

Before pgserver looks at the data directory, with pgserver's own lock held (so
no other chatlog is half-way through starting the same server):
- owners that are gone are forgotten (a pid now used by a process started
  after the owner list was last written is gone too);
- a postmaster left running with no owner alive is an orphan: it is stopped
  (fast shutdown, as `pg_ctl stop -m fast` does) and started again below, so
  the server always runs with this installation's binaries and settings;
- a `postmaster.pid` naming a live process that is not this data directory's
  postgres (its pid was reused, e.g. after a reboot) is removed, else
  PostgreSQL would refuse to start; so is one naming a dead postmaster (it
  may not be reaped yet, and a zombie looks alive), once its backends are gone.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from pathlib import Path

log = logging.getLogger("chatlog")

OWNERS = ".handle_pids.json"
STOP_WAIT_SECONDS = 30.0


def _pgserver():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (as under
    # su, sudo, containers and CI) and falls back to /tmp/runtime-<uid>, which
    # pgserver only uses for a lock file: nothing for a user to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
        from pgserver.postgres_server import PostgresServer
    return pgserver, PostgresServer


def _process(pid: int):
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def owners_alive(pgdata: Path) -> list[int]:
    """The owners in pgserver's list whose process still runs (and is the one
    that wrote itself there: started before the list was last written)."""
    path = pgdata / OWNERS
    if not path.exists():
        return []
    written = path.stat().st_mtime
    alive = []
    for pid in json.loads(path.read_text() or "[]"):
        process = _process(int(pid))
        if process is not None and process.create_time() <= written + 1:
            alive.append(int(pid))
    return alive


def _ours(pid: int, pgdata: Path):
    """The process pid if it is a live postgres working in pgdata, else None."""
    process = _process(pid)
    if process is None:
        return None
    try:
        ours = process.name() == "postgres" and Path(process.cwd()).resolve() == pgdata.resolve()
    except Exception:  # noqa: BLE001 - psutil.AccessDenied and friends: not provably ours
        ours = False
    return process if ours else None


def postmaster(pgdata: Path):
    """(pid in postmaster.pid, the process if it is this data directory's postgres)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None, None
    return pid, _ours(pid, pgdata)


def _gone(pid: int, timeout: float) -> bool:
    """Wait (up to timeout) until pid is gone or a zombie. Not psutil's wait():
    the postmaster is not our child, and until init reaps it a zombie exists."""
    deadline = time.monotonic() + timeout
    while _process(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop(process) -> None:
    """Fast shutdown (SIGINT: sessions end, a checkpoint is written), then
    immediate (SIGQUIT), then SIGKILL; each with a deadline."""
    import psutil

    for sig, wait in ((signal.SIGINT, STOP_WAIT_SECONDS), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            return
        if _gone(process.pid, wait):
            return
    raise RuntimeError(f"the orphaned embedded PostgreSQL (pid {process.pid}) did not stop")


def _leftovers(pgdata: Path) -> list:
    """Processes still working in pgdata (a killed postmaster's backends exit
    by themselves within moments: they watch for their postmaster's death)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE \
                    and Path(process.cwd()) == pgdata:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def clean_up_orphan(pgdata: Path, lock) -> None:
    """Make pgdata's state true again after an owner was killed (see the module's docstring)."""
    import psutil

    with lock:
        owners_path = pgdata / OWNERS
        alive = owners_alive(pgdata)
        if owners_path.exists():
            owners_path.write_text(json.dumps(alive))
        if alive:
            return  # another chatlog serve uses this server: share it, as pgserver does
        pid, process = postmaster(pgdata)
        if process is not None:
            log.warning("stopping the embedded PostgreSQL (pid %s) left running by a chatlog serve that was "
                        "killed before it could stop it", pid)
            _stop(process)
        elif pid is not None:
            # no live postmaster of ours behind the pid file: it died (perhaps not reaped yet: a zombie
            # still answers kill(pid, 0), and both pgserver and PostgreSQL would then take it for a live
            # server), or its pid now belongs to another program. Its backends go first, then the file.
            leftovers = _leftovers(pgdata)
            _, running = psutil.wait_procs(leftovers, timeout=5)
            for backend in running:
                backend.kill()
            psutil.wait_procs(running, timeout=5)
            log.warning("removing the stale %s (pid %s is not this data directory's PostgreSQL)",
                        pgdata / "postmaster.pid", pid)
            _remove_stale_lock_files(pgdata, pid)


def _remove_stale_lock_files(pgdata: Path, pid: int) -> None:
    """postmaster.pid, and the lock file beside the socket if it names no live postgres of ours either."""
    pid_file = pgdata / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    if len(lines) >= 5 and lines[3].strip() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        try:
            if _ours(int(socket_lock.read_text().splitlines()[0]), pgdata) is None:
                socket_lock.unlink()
        except (FileNotFoundError, IndexError, ValueError):
            pass
    pid_file.unlink(missing_ok=True)


def banner(data_dir: Path, pgdata: Path) -> None:
    rule = "=" * 78
    for line in (rule,
                 "DATABASE_URL is not set: chatlog runs an embedded PostgreSQL (stopped when it exits)",
                 f"  data directory: {data_dir}",
                 f"  PostgreSQL data: {pgdata}",
                 "  change it with CHATLOG_DATA_DIR=/some/dir, or set DATABASE_URL to use your own PostgreSQL",
                 rule):
        log.info("%s", line)


def start(data_dir: Path) -> str:
    """Start (or share) the embedded PostgreSQL under data_dir; return its URL."""
    data_dir = data_dir.expanduser().resolve()
    pgdata = data_dir / "pgdata"
    data_dir.mkdir(parents=True, exist_ok=True)
    banner(data_dir, pgdata)
    pgserver, server_class = _pgserver()
    if pgdata.exists():
        # pgserver's inter-process lock (the one its get_server holds while it starts a server and adds
        # its owner) and its owner list are internals of pgserver 0.1.x: without the lock, no clean-up
        lock = getattr(server_class, "_lock", None)
        if lock is not None:
            clean_up_orphan(pgdata, lock)
        else:
            log.warning("pgserver %s has no _lock: an embedded PostgreSQL orphaned by a kill -9 is not looked for",
                        getattr(pgserver, "__version__", "?"))
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


__all__ = ["start", "owners_alive", "postmaster", "clean_up_orphan"]
