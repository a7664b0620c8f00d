"""What every launcher shares: the environment torchrun sets, bad input as one line and exit status 2,
logging from rank 0, and one rank's error stopping every rank."""
import argparse
import copy
import os
import re
import sys
from dataclasses import dataclass

import torch.distributed as dist

from .errors import RankError, UsageError  # noqa: F401  (re-exported: the launchers and older imports use cli's)

EXIT_PEER = 3  # the exit status of a rank that ends because a peer stopped answering or died


@dataclass(frozen=True)
class Env:
    rank: int
    world: int
    local_rank: int
    local_world: int
    torchrun: bool  # launched by torchrun (RANK is set), even with one process


def env():
    """The environment torchrun sets for each process. The one place that reads it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Env(rank=int(os.environ.get("RANK", "0")), world=world,
               local_rank=int(os.environ.get("LOCAL_RANK", "0")),
               local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
               torchrun="RANK" in os.environ)


def rendezvous():
    """(MASTER_ADDR, MASTER_PORT, under torchrun's agent): where the rendezvous store listens. Under
    torchrun the agent holds it (TORCHELASTIC_RUN_ID is set); launched by hand, rank 0 does."""
    return (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
            "TORCHELASTIC_RUN_ID" in os.environ)


def attempt_prefix():
    """The store key prefix of this torchrun attempt. torchrun's agent keeps one rendezvous store for the
    whole job (TORCHELASTIC_USE_AGENT_STORE) and its workers' keys carry no attempt: after a restart a rank
    could read a dead peer's gloo address, or its NCCL id, from the attempt before (pytorch/pytorch#135712)
    and fail in connectFullMesh with "Connection refused". TORCHELASTIC_RESTART_COUNT is the same on every
    worker of an agent, and every agent restarts its workers together."""
    return f"split_alexnet/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def log(*args, **kwargs):
    """Print from rank 0 only (the one place the launchers log through)."""
    if env().rank == 0:
        print(*args, **kwargs, flush=True)


# what gloo's and NCCL's errors say when the other end of a collective is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport",
              "NCCL communicator was aborted", "remote process exited")


def peer_gone(e):
    """Whether exception e is a collective failing because a peer process died or its link broke."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_GONE))


class Parser(argparse.ArgumentParser):
    """Every launcher's parser: a bad flag is one line (UsageError), like every other bad input."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class DefaultsHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default (a flag without help text too), but an empty one (its help
    says in words what it means); the description is printed as written."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, "", argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def run_main(main):
    """Run a launcher's main(): a UsageError becomes one line on stderr and exit status 2; a collective
    that fails because a peer died becomes one line on every surviving rank and exit status 3."""
    try:
        sys.exit(main())
    except UsageError as e:
        if env().rank == 0 or isinstance(e, RankError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        if not peer_gone(e):
            raise
        why = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))   # gloo's [source:line] prefix
        why = why if len(why) <= 160 else why[:157] + "..."
        print(f"error: rank {env().rank}: a peer process ended or its connection broke ({type(e).__name__}: "
              f"{why}); the peer's own message, if any, is above: resume from the newest checkpoint "
              f"(docs/troubleshooting.md)", file=sys.stderr, flush=True)
        sys.exit(EXIT_PEER)


def stop_all_on_error(fn, world):
    """Run fn() on this rank and return its result; if it raises a UsageError on any rank, every rank
    raises it (the lowest such rank's message), so that no rank is left waiting in a collective.
    A collective: with world > 1 every rank of the process group must call it."""
    result, error = None, None
    try:
        result = fn()
    except UsageError as e:
        error = str(e)
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UsageError(error)
    return result
