"""cli: torchrun's environment is read in one place; logging and errors come from rank 0 only; one
rank's error stops every rank."""
import re

import pytest
from conftest import REPO, spawn

from split_alexnet.cli import Env, UsageError, env, log, run_main, stop_all_on_error

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_env_reads_what_torchrun_sets(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert env() == Env(rank=0, world=1, local_rank=0, local_world=1, torchrun=False)
    for name, value in zip(TORCHRUN_VARS, ("3", "4", "1", "2")):
        monkeypatch.setenv(name, value)
    assert env() == Env(rank=3, world=4, local_rank=1, local_world=2, torchrun=True)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert env().local_world == 4                  # one node: all processes are local


def test_the_environment_is_read_only_in_cli():
    """No module but cli.py reads RANK, WORLD_SIZE, LOCAL_RANK or LOCAL_WORLD_SIZE from the environment."""
    reads_env = re.compile(r"environ|getenv")
    torchrun_var = re.compile(r"""["'](LOCAL_)?(RANK|WORLD_SIZE)["']""")
    readers = {str(path.relative_to(REPO))
               for folder in ("split_alexnet", "launch") for path in (REPO / folder).rglob("*.py")
               for line in path.read_text().splitlines()
               if reads_env.search(line) and torchrun_var.search(line)}
    assert readers == {"split_alexnet/cli.py"}


def test_log_and_errors_from_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log("from rank 1")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: (_ for _ in ()).throw(UsageError("bad input")))
    assert e.value.code == 2 and capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    log("from rank 0")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: (_ for _ in ()).throw(UsageError("bad input")))
    assert e.value.code == 2 and capsys.readouterr() == ("from rank 0\n", "error: bad input\n")


def _one_rank_fails(rank, world):
    def work():
        if rank == 1:
            raise UsageError("rank 1's shard is truncated")
        return "read"
    with pytest.raises(UsageError, match="rank 1's shard is truncated"):
        stop_all_on_error(work, world)             # rank 0 succeeded, and stops all the same
    assert stop_all_on_error(lambda: f"rank {rank}", world) == f"rank {rank}"


@pytest.mark.slow
def test_one_ranks_error_stops_every_rank():
    spawn(_one_rank_fails, 2)
