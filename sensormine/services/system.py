"""Operating-system plumbing: finding/installing Debian packages, service users, permissions."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sensormine.services.errors import ServiceError

# Debian puts daemons in sbin, which is often missing from a non-root PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


@dataclass(frozen=True)
class Requirement:
    """An executable a service needs and the Debian packages that provide it."""

    what: str
    packages: tuple[str, ...]
    find: Callable[[], str | None]
    hint: str = ""  # extra advice when it is missing (e.g. the --embedded alternative)


def is_root() -> bool:
    """True when running with effective uid 0."""
    return os.geteuid() == 0


def which(name: str) -> str | None:
    """`shutil.which` that also looks in the sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        candidate = Path(d) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def binary(name: str, packages: Iterable[str], hint: str = "") -> Requirement:
    """Requirement for an executable found on PATH (or sbin)."""
    return Requirement(name, tuple(packages), lambda: which(name), hint)


def ensure_installed(reqs: Iterable[Requirement], progress: Callable[[str], None]) -> None:
    """Install missing requirements with apt-get when root; otherwise raise with the exact command."""
    unique = {r.what: r for r in reqs}
    missing = [r for r in unique.values() if r.find() is None]
    if not missing:
        return
    packages = sorted({p for r in missing for p in r.packages})
    names = ", ".join(r.what for r in missing)
    hint = "".join(sorted({f"\n{r.hint}" for r in missing if r.hint}))
    command = f"apt-get install -y {' '.join(packages)}"
    apt = which("apt-get")
    if is_root() and apt:
        progress(f"missing {names}: running apt-get update + {command} (one-off) ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        out = ""
        # A failed `update` is not fatal: the cached package lists may still be good enough.
        for argv in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "--no-install-recommends", *packages]):
            res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=1800)
            out += res.stdout + res.stderr
        missing = [r for r in missing if r.find() is None]
        if not missing:
            progress(f"installed {' '.join(packages)}")
            return
        tail = "\n".join(out.splitlines()[-15:])
        raise ServiceError(f"could not install {names} with `{command}`:\n{tail}{hint}")
    raise ServiceError(f"{names} not found. Install with:\n  sudo apt-get update && sudo {command}{hint}")


def service_user(preferred: str) -> pwd.struct_passwd | None:
    """The unprivileged user to run a daemon as when we are root (created if needed); None otherwise."""
    if not is_root():
        return None
    for name in (preferred, "sensormine"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    # No Debian package created the user (e.g. embedded mode on a bare box): make our own.
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "sensormine"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("sensormine")


def _can_enter(path: Path, user: pwd.struct_passwd) -> bool:
    st = path.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def others_can_reach(path: Path) -> bool:
    """Whether every existing ancestor of `path` lets other users pass (o+x)."""
    return all(d.stat().st_mode & stat.S_IXOTH for d in path.resolve().parents if d.exists())


def private_state_home(state_root: Path) -> Path:
    """The folder `private_state_fallback` uses for a state dir (not created)."""
    digest = hashlib.sha1(str(state_root.resolve()).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"sensormine-{digest}"


def private_state_fallback(state_root: Path) -> Path:
    """Where servers that drop root live when the state dir sits in a private folder (e.g. a 0700 temp dir).

    Deterministic per state dir, so `down` and `status` find what `up` started.
    """
    home = private_state_home(state_root)
    home.mkdir(mode=0o711, exist_ok=True)
    home.chmod(0o711)
    (home / "state-dir").write_text(f"{state_root.resolve()}\n")  # who this belongs to, for humans
    return home


def ensure_reachable(path: Path, user: pwd.struct_passwd, owned_root: Path) -> None:
    """Make sure `user` can traverse to `path`; fix dirs under `owned_root`, explain the rest."""
    path = path.resolve()
    owned_root = owned_root.resolve()
    for d in [*reversed(path.parents), path]:
        if _can_enter(d, user):
            continue
        if d == owned_root or owned_root in d.parents:
            d.chmod(d.stat().st_mode | stat.S_IXOTH)  # our own state dir: o+x is enough
            continue
        raise ServiceError(
            f"user {user.pw_name!r} cannot enter {d} (mode {stat.filemode(d.stat().st_mode)}), so it cannot reach "
            f"{path}. Use a state dir it can reach, e.g. SENSORMINE_STATE_DIR=/var/tmp/sensormine, "
            f"or run `chmod o+x {d}`."
        )


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    """Give `path` and everything below it to `user` (root only)."""
    if not is_root():
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), user.pw_uid, user.pw_gid, follow_symlinks=False)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secrets), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)
