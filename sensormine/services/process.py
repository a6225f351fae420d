"""Process and port helpers for the service launcher (Linux-first, /proc aware)."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Popen handles of the servers this interpreter started. Holding them keeps Python from
# warning about "still running" children and lets us reap them (no zombies) on `down`.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def free_port(preferred: int | None = None) -> int:
    """Return `preferred` if it is free on 127.0.0.1, else a free port picked by the kernel."""
    if preferred:
        with socket.socket() as s:
            # Servers bind with SO_REUSEADDR, so TIME_WAIT leftovers of their previous run
            # don't block them; test the same way or we'd never get the old port back.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot); identifies a process across pid reuse."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _reap(pid: int) -> None:
    """Collect the exit status of a child we started so it does not linger as a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def pid_alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if `pid` runs, is not a zombie, and (if given) has the recorded start time."""
    if not pid:
        return False
    _reap(pid)
    fields = _proc_stat(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (not Linux): fall back to signal 0
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


@dataclass(frozen=True)
class _RunAs:
    """Popen identity arguments; all None means "as ourselves"."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None
    env: dict[str, str] | None = None


def _run_as(user: pwd.struct_passwd | None, env: dict[str, str] | None = None) -> _RunAs:
    """Run the child as `user` (only possible as root) with that user's primary group only."""
    if user is None or os.geteuid() != 0:
        return _RunAs(env={**os.environ, **env} if env else None)
    base = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name, **(env or {})}
    return _RunAs(user.pw_uid, user.pw_gid, [], base)


def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    user: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    """Start a detached server (own session, output appended to `log`) and return its handle."""
    who = _run_as(user, env)
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        # A new session keeps Ctrl-C in the launcher's terminal away from the servers and
        # lets them outlive the launcher; the pid is also the process-group id for `down`.
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            env=who.env,
            user=who.user,
            group=who.group,
            extra_groups=who.extra_groups,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    user: pwd.struct_passwd | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (optionally as `user`, with `env` added), capturing its output."""
    who = _run_as(user, env)
    return subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
        env=who.env,
        user=who.user,
        group=who.group,
        extra_groups=who.extra_groups,
    )


def wait_gone(pid: int, start_time: int | None, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, start_time):
            return True
        time.sleep(0.1)
    return not pid_alive(pid, start_time)


def terminate(pid: int | None, start_time: int | None, grace: float = 15.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL it after `grace` seconds."""
    if not pid or not pid_alive(pid, start_time):
        return

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            # Servers were started as session leaders; signal the whole group so helper
            # children (e.g. JVM or moto threads' subprocesses) go too.
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    if not wait_gone(pid, start_time, grace):
        send(signal.SIGKILL)
        wait_gone(pid, start_time, 5.0)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)


def log_tail(path: Path, lines: int = 25) -> str:
    """Last `lines` lines of a log file (empty string if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
