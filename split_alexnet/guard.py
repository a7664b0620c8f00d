"""Holding up under faults and mistakes (docs/troubleshooting.md lists every message):

- `agree`: after the process group forms, every rank compares what must be the same on all of them
  (the resolved config but its rank-local fields, the spec, the data set's size and classes, torch's
  version); a difference stops every rank with one line naming the fields and each rank's value.
- `Watchdog`: a heartbeat through the rendezvous store (torchrun's agent holds it), separate from the
  collective timeout (--timeout). A rank whose heartbeat stops for --peer-timeout seconds (killed,
  stopped, its host gone) ends the job with a line naming it and the phase / exchange where this rank
  waited. The heartbeat runs on its own thread, so long work on a live rank (data preparation,
  evaluation, checkpoint writes) never trips it; only the collective timeout bounds a wait among live
  ranks, which is why that one can be long.
- `die_with_parent`: a rank ends when its torchrun agent dies (Linux parent-death signal); the
  watchdog also ends it when the agent's store stops answering (the agent of another node).
- `check_out`: an output directory (or its checkpoints/) that cannot be written is refused before any
  work: a probe of some bytes is written and synced, so a full disk is found too.
- `lock_out`: the folder is this job's alone, on every rank (outlock.py): a second job is refused naming
  the first's host and pid.
- `Divergence`: the loss against the chance level and the weights' norm against its start, not only NaN.
(resume.py's `resolve_resume` decides a resumed run's settings: the checkpoint's, and the flags given
where they are safe to change.)
"""
import ctypes
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import outlock
from .cli import EXIT_PEER, attempt_prefix, rendezvous, stop_all_on_error  # EXIT_PEER: a peer stopped answering
from .errors import UsageError

# ---- where this rank is (for the watchdog's message) -----------------------------------------------

_phase = "start-up"


def phase(name):
    """Record what this rank is doing now ("training step 12", "evaluation", "checkpoint write")."""
    global _phase
    _phase = name


def where():
    from . import comm
    exchange = comm.last_exchange
    return _phase + (f" (last exchange: {exchange})" if exchange and _phase.startswith("training") else "")


# ---- the same run on every rank --------------------------------------------------------------------

# differ per rank or per node without changing what is computed
RANK_LOCAL = ("data_dir", "download", "workers", "device", "devices", "quiet", "plot", "log_every")


def config_fields(cfg):
    from dataclasses import asdict
    fields = {k: v for k, v in asdict(cfg).items() if k not in RANK_LOCAL}
    fields["torch"] = torch.__version__
    return fields


def data_fields(job):
    from .checkpoint import spec_dict
    return dict(out=job.out, spec=spec_dict(job.spec), train_images=len(job.train_set),
                val_images=len(job.val_set), classes=list(job.classes))


def _show(value, limit=60):
    s = json.dumps(value, default=str) if not isinstance(value, str) else value
    return s if len(s) <= limit else s[:limit - 3] + "..."


def disagreement(per_rank):
    """None if every rank's dict is the same, else one line naming each differing field."""
    digests = [hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
               for d in per_rank]
    if len(set(digests)) == 1:
        return None
    keys = sorted(set().union(*per_rank))
    parts = []
    for k in keys:
        values = [d.get(k) for d in per_rank]
        if any(v != values[0] for v in values):
            parts.append(f"{k} (" + ", ".join(f"rank {r}: {_show(v)}" for r, v in enumerate(values)) + ")")
    return "; ".join(parts)


def agree(world, fields, what="the run"):
    """A collective: every rank gets UsageError naming the fields that differ between ranks."""
    if world <= 1:
        return
    per_rank = [None] * world
    dist.all_gather_object(per_rank, fields)
    diff = disagreement(per_rank)
    if diff:
        raise UsageError(f"the ranks disagree on {what}: {diff}: start every rank with the same arguments, "
                         f"data set and torch version")


# ---- liveness ------------------------------------------------------------------------------------

class Watchdog(threading.Thread):
    """Beats `hb/RANK` in the rendezvous store every `beat` s and watches the others' beats."""

    def __init__(self, rank, world, timeout, beat=1.0, prefix="split_alexnet"):
        super().__init__(daemon=True, name="split_alexnet-watchdog")
        self.rank, self.world, self.timeout, self.beat = rank, world, timeout, beat
        self.prefix, self.stopped = prefix, threading.Event()
        addr, port, _ = rendezvous()
        # its own client: a short timeout of its own, and no lock shared with the process group's store
        self.store = dist.TCPStore(addr, port, is_master=False,
                                   timeout=timedelta(seconds=max(5.0, min(timeout, 30.0))))
        self.store.set(f"{prefix}/pid/{rank}", f"{socket.gethostname()} {os.getpid()}")

    def run(self):
        others = [r for r in range(self.world) if r != self.rank]
        seen = {r: (None, time.monotonic()) for r in others}
        while not self.stopped.wait(self.beat):
            try:
                self.store.add(f"{self.prefix}/hb/{self.rank}", 1)
                counts = {r: self.store.add(f"{self.prefix}/hb/{r}", 0) for r in others}
            except Exception as e:  # the store's holder (torchrun's agent, or rank 0 by hand) is gone
                if self.stopped.is_set():
                    return
                self.fail(f"the rendezvous store stopped answering ({type(e).__name__}): the torchrun "
                          f"agent (or, launched by hand, rank 0) is gone; rank {self.rank} was in {where()}")
            now = time.monotonic()
            for r, count in counts.items():
                if count != seen[r][0]:
                    seen[r] = (count, now)
                elif now - seen[r][1] > self.timeout:
                    self.fail(f"rank {r} stopped answering: no heartbeat for {now - seen[r][1]:.0f} s "
                              f"(--peer-timeout {self.timeout:g}){self._end_stopped(r)}; rank {self.rank} "
                              f"waited in {where()}: see docs/troubleshooting.md")

    def _end_stopped(self, r):
        """A stopped (SIGSTOP) peer on this host cannot act on torchrun's SIGTERM, and torchrun waits
        30 s before its SIGKILL: end it now, so the job ends at once."""
        try:
            host, pid = self.store.get(f"{self.prefix}/pid/{r}").decode().split()
            if host != socket.gethostname():
                return ""
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("T", "t"):
                os.kill(int(pid), signal.SIGKILL)
                return f"; its process {pid} was stopped (SIGSTOP): ended it"
        except Exception:
            pass
        return ""

    def fail(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER)

    def stop(self):
        """Stop beating and wait for the thread (its store call is bounded by the store's timeout): no
        thread of ours is inside the store when the process group is destroyed or the interpreter exits."""
        self.stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join()


_watchdog = None


def start(ctx, peer_timeout):
    """Under torchrun with more than one rank: the parent-death signal and the heartbeat watchdog."""
    global _watchdog
    if ctx is None or ctx.backend == "none":
        return None
    die_with_parent()
    if ctx.world > 1 and peer_timeout > 0:
        _watchdog = Watchdog(ctx.rank, ctx.world, peer_timeout, prefix=attempt_prefix())   # a restart's own keys
        _watchdog.start()
    return _watchdog


def stop():
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def die_with_parent():
    """Linux: SIGKILL this process when the process that started it (torchrun's agent) dies. Called as
    the first line of a launcher's main (and again by start: it is idempotent); an agent that died
    before (during the imports) is seen as a parent that changed to init, and this rank ends at once."""
    _, _, agent = rendezvous()
    if not agent or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:   # the agent died before the signal was set
        os._exit(EXIT_PEER)
    return True


# ---- output directory ------------------------------------------------------------------------------

PROBE_BYTES = 64 * 1024   # a probe file's size: big enough that a full disk refuses it (an empty file
#                          needs no data block and is created on a full disk)


def _probe(folder, target):
    """Write and sync PROBE_BYTES in `folder`, then remove them; UsageError naming the cause if it fails."""
    import tempfile
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".split_alexnet-probe-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UsageError(f"--out {target}: cannot write in {folder} ({e.strerror}): give an --out in a "
                         f"writable directory with free space") from None
    finally:
        if probe is not None:
            try:
                os.remove(probe)
            except OSError:
                pass


def check_out(out, checkpoints=False):
    """Refuse an --out that is a file, or under a file, or in a directory this process cannot write (its
    permissions, a read-only file system, a full disk); with `checkpoints` (--save-every), the same for
    an OUT/checkpoints that is already there."""
    target = out or "runs"
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"--out {target} is an existing file, not a directory: give a new directory")
    parent = target
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {target}: {parent} is a file, not a directory: give another --out")
    _probe(parent, target)
    sub = os.path.join(target, "checkpoints")
    if checkpoints and os.path.lexists(sub):
        if not os.path.isdir(sub):
            raise UsageError(f"--out {target}: {sub} is not a directory, and checkpoints are written there: "
                             f"remove it or give another --out")
        _probe(sub, target)


def lock_out(out, world=1):
    """Take the lock on --out (outlock.py) on every rank of this job; a collective with world > 1: if any
    rank is refused, every rank stops with its line."""
    took_over = stop_all_on_error(lambda: outlock.acquire(out), world)
    if took_over:
        print(f"warning: {took_over}", file=sys.stderr, flush=True)


def unlock_out():
    outlock.release()


# ---- divergence ----------------------------------------------------------------------------------

class Divergence:
    """When training has diverged, beyond NaN: a finite loss can be absurd (4e19) and finite weights
    exploded (1e27), and a checkpoint of them is worse than none.

    - the loss: more than GROWTH times its reference, the larger of its first value in this run (or
      resume) and the chance level ln(classes) (the cross-entropy of the uniform guess). The first
      value, not the chance level alone: an init at the wrong input scale starts in the thousands and
      comes down (paper-he on 0-255 input); a hundredfold growth from there is no training step;
    - the weights: a norm not finite, or more than GROWTH times the norm at the start of this run (or
      of its resume). Weight decay bounds a healthy run's norm; one that grows a hundredfold is
      running away."""

    GROWTH = 100.0

    def __init__(self, classes):
        self.classes = max(classes, 2)
        self.chance = math.log(self.classes)
        self.loss0 = self.norm0 = None

    def loss(self, loss):
        """None, or why the loss says the run diverged; the first finite call records the start."""
        if not math.isfinite(loss):
            return f"the training loss became {loss}"
        if self.loss0 is None:
            self.loss0 = loss
        ref, what = max((self.loss0, "its first value in this run"),
                        (self.chance, f"the chance level ln({self.classes})"))
        if loss > self.GROWTH * ref:
            return f"the training loss grew to {loss:.4g}, over {self.GROWTH:g} x {what} ({ref:.3g})"
        return None

    def weights(self, params):
        """None, or why the weights' norm says the run diverged; the first call records the start."""
        def norm_of(p):                            # float32, unless that overflows (|w| past ~1e19)
            n = torch.linalg.vector_norm(p.detach().float()).item()
            return n if math.isfinite(n) else torch.linalg.vector_norm(p.detach().double()).item()
        with torch.no_grad():                      # per tensor: the streams layout spans devices
            norm = math.hypot(*map(norm_of, params))
        if not math.isfinite(norm):
            return f"the weights' norm became {norm}"
        if self.norm0 is None:
            self.norm0 = norm
            return None
        if norm > self.GROWTH * max(self.norm0, 1e-12):
            return (f"the weights' norm grew from {self.norm0:.4g} to {norm:.4g}, over {self.GROWTH:g} x "
                    f"its start")
        return None
