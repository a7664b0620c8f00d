"""The lock on --out: one job per run folder, taken by every rank of the job before it builds anything.

The lock is the file OUT/.split_alexnet.lock (JSON): the job that holds it and its holders, one
[host, pid, start time] per rank that took it. A rank takes it, under flock() on the folder (which
serialises every taker on this folder), when there is none, when the job that holds it is its own job,
or when every holder is dead: a process on this host that no longer runs (its pid gone, a zombie, or
the pid reused by a process that started later than the holder). A holder on another host cannot be
checked from here and counts as alive unless it is of the same job. Each rank removes itself at exit;
the last removes the file (and the folder, if the lock created it and nothing else was written there).

The job: torchrun's run id (TORCHELASTIC_RUN_ID; the same across the agent's restarts of its workers)
with the rendezvous address; by hand, the rendezvous address (MASTER_ADDR:MASTER_PORT: two live jobs
cannot share one); one process, the process itself. A job restarted with the same command after a crash
or a preemption finds its old holders dead and takes the lock over.
"""
import json
import os
import socket
import sys

from .cli import env, rendezvous
from .errors import UsageError

LOCK = ".split_alexnet.lock"

try:
    import fcntl
except ImportError:                                 # not POSIX: no serialisation, the rest still holds
    fcntl = None


def job_id():
    """What every rank of this job has in common, and no other job has."""
    addr, port, agent = rendezvous()
    if agent:
        return f"torchrun {os.environ['TORCHELASTIC_RUN_ID']} at {addr}:{port}"
    if env().torchrun:
        return f"rendezvous {addr}:{port}"
    return f"process {socket.gethostname()} {os.getpid()}"


def _start_time(pid):
    """The process's start time in clock ticks since boot (/proc), or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])   # a zombie has ended
    except (OSError, IndexError, ValueError):
        return -1                                   # no such process


def me():
    return [socket.gethostname(), os.getpid(), _start_time(os.getpid())]


def alive(holder):
    """Whether a holder [host, pid, start] may still run. Another host's: assumed so."""
    host, pid, start = holder
    if host != socket.gethostname():
        return True
    now = _start_time(pid)
    if now is None or now == -1:
        return now == -1 and not os.path.isdir("/proc") and pid_alive(pid)   # no /proc: ask the kernel
    return start is None or now == start            # a later start: the pid was reused


class _Flock:
    """flock() on the folder itself: no file of its own. Where the file system has no locks (some
    network file systems), the takers are not serialised and O_EXCL-free races remain possible."""

    def __init__(self, folder):
        self.fd = os.open(folder, os.O_RDONLY)

    def __enter__(self):
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)                           # releases the flock


def _read(path):
    try:
        with open(path) as f:
            held = json.load(f)
        if isinstance(held, dict) and isinstance(held.get("holders"), list):
            return held
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    return dict(job="unreadable", holders=[["?", 0, None]], created=False, damaged=True)


def _write(path, held):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(held, f)
    os.replace(tmp, path)


_held = None   # the folder this process holds


def acquire(out):
    """Take the lock on `out` for this job (creating the folder). Raises UsageError naming the job that
    holds it. Returns a line to print when a dead job's lock was taken over, else None."""
    global _held
    out = os.path.abspath(out)
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror}): give an --out in a writable "
                         f"directory") from None
    path, job, took_over = os.path.join(out, LOCK), job_id(), None
    with _Flock(out):
        held = _read(path)
        if held and held.get("job") != job:
            live = [h for h in held["holders"] if alive(h)]
            if held.get("damaged"):
                raise UsageError(f"--out {out}: its lock {path} cannot be read: if no run writes there, "
                                 f"delete it; or give another --out")
            if live:
                host, pid = live[0][0], live[0][1]
                where = "" if host == socket.gethostname() else \
                    f" (on another host: if that run is gone, delete {path})"
                raise UsageError(f"--out {out} is in use by another run: host {host}, pid {pid}{where}: wait "
                                 f"for it to end, or give another --out")
            took_over = (f"--out {out}: took over the lock of a run that is gone (host "
                         f"{held['holders'][0][0] if held['holders'] else '?'}, pid "
                         f"{held['holders'][0][1] if held['holders'] else '?'})")
            held = None
        if held is None:
            held = dict(job=job, holders=[], created=created)
        held["holders"] = [h for h in held["holders"] if alive(h) and h[:2] != me()[:2]] + [me()]
        _write(path, held)
    _held = out
    return took_over


def release():
    """This process leaves the lock it holds; the last holder removes it (and an empty folder the lock
    created). Never raises."""
    global _held
    out, _held = _held, None
    if out is None:
        return
    path = os.path.join(out, LOCK)
    try:
        with _Flock(out):
            held = _read(path)
            if not held or held.get("job") != job_id():
                return
            held["holders"] = [h for h in held["holders"] if h[:2] != me()[:2] and alive(h)]
            if held["holders"]:
                _write(path, held)
                return
            os.remove(path)
            if held.get("created"):
                try:
                    os.rmdir(out)                   # only if nothing else was written there
                except OSError:
                    pass
    except OSError as e:
        print(f"warning: --out {out}: could not release its lock ({e.strerror})", file=sys.stderr, flush=True)


def pid_alive(pid):
    """Whether a process of this pid exists on this host (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:                        # it exists, owned by another user
        return True
