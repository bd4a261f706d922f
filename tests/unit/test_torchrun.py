"""How robe_dist.torchrun ends a run whose workers failed (the status and the one line)."""

import signal
import subprocess
import sys

import pytest

from robe_dist import ops
from robe_dist.torchrun import exit_status, main


@pytest.mark.parametrize(
    "codes, status",
    [
        ({0: 2, 1: 2}, 2),  # a user error: every rank exits 2
        ({0: -15, 1: 2}, 2),  # rank 1 left first, torchrun stopped rank 0 as it left the group
        ({0: -9, 1: 3}, 3),  # a NaN loss, rank 0 killed after the grace period
        ({0: 143, 1: -15}, 143),  # preempted: checkpointed and left with 128 + SIGTERM
        ({1: 2, 0: 3}, 3),  # the lowest rank's status, whatever the order torchrun lists them in
        ({0: 4, 1: 2}, 2),  # rank 1 alone met a user error and said it; rank 0's collective failed (4)
    ],
)
def test_explained_statuses_pass_through_silently(codes, status):
    assert exit_status(codes) == (status, None)


@pytest.mark.parametrize(
    "codes, status",
    [
        ({0: 1, 1: -15}, 1),  # a crash: its traceback is above
        ({0: -11, 1: 2}, 1),  # a segfault is not explained by another rank's user error
        ({0: -15, 1: -15}, 1),  # stopped from outside with nothing said
        ({0: 2, 1: 1}, 2),  # one rank crashed while the other met a user error: list both
        ({0: 4, 1: 1}, 1),  # rank 1 crashed, rank 0's collective failed: the crash's status
        ({0: 4, 1: 4}, 1),  # every rank says another left first: nothing explains it
        ({0: 4, 1: -9}, 1),  # rank 1 killed from outside (OOM killer), rank 0's collective failed
        ({0: -7, 1: -7}, 1),  # SIGBUS (a data file cut short while memory-mapped): robe-train's line above
        ({0: -11, 1: -15}, 1),  # SIGSEGV: nothing printed
    ],
)
def test_other_failures_are_listed_in_one_line(codes, status):
    got, line = exit_status(codes)
    assert got == status
    assert line is not None and "\n" not in line
    assert all(f"rank {r} status {c}" in line for r, c in codes.items())


def test_no_workers_is_one_line_and_exit_2(capsys):
    assert main(["--standalone", "--nproc_per_node=0", "-m", "robe_dist.train"]) == 2
    assert capsys.readouterr().err == "torchrun: --nproc_per_node must be at least 1 (or auto, gpu, cpu), got 0\n"


def test_a_failed_collective_is_a_peer_lost_only_by_the_words_for_it():
    """``lost_a_peer`` (robe-train then prints one line and exits 4, a consequence for the
    launcher): gloo's and NCCL's words for a peer that has gone; any other backend error (this
    rank's own: a CUDA fault, a network set-up error, a time-out) keeps its traceback."""
    import torch.distributed as dist

    from robe_dist.trainer.env import lost_a_peer

    gloo = "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8383. This is typically caused by"
    assert lost_a_peer(RuntimeError(gloo))
    assert lost_a_peer(dist.DistBackendError("NCCL error: remote process exited or there was a network error"))
    assert not lost_a_peer(dist.DistBackendError("NCCL error in: ..., unhandled cuda error\nLast error: illegal address"))
    assert not lost_a_peer(RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete"))
    assert not lost_a_peer(ValueError("Connection closed by peer"))  # not a collective's error


def test_the_shutdown_barrier_key_differs_between_torchrun_attempts(monkeypatch):
    """torchrun's store outlives ``--max-restarts`` restarts, whose processes count from 0 again:
    a key of attempt 0 found set in attempt 1 would end the barrier before the others came."""
    from robe_dist.trainer import env

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = env._barrier_key()
    monkeypatch.setattr(env, "_shutdowns", __import__("itertools").count())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert env._barrier_key() != first


def test_a_rank_waiting_for_ranks_that_never_come_says_so(tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by hand (or a node that did not start):
    joining the process group waits for the others; after ``JOIN_NOTICE_S`` the rank says so."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import robe_dist.trainer.env as e\nfrom robe_dist.train_config import DistConfig\n"
            "e.JOIN_NOTICE_S = 1.0\ne.init_distributed(DistConfig())\n")  # fmt: skip
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stderr:  # (the process itself would wait for the process group's time-out)
            if line.startswith("robe-train:"):
                break
    finally:
        proc.kill()
        proc.communicate()
    assert line.startswith(f"robe-train: rank 0 of 2 has waited 1 s for the other ranks at 127.0.0.1:{port};")


def test_a_worker_killed_by_a_signal_is_named_and_not_said_to_have_explained_itself():
    _, line = exit_status({0: -7, 1: -7})
    assert "rank 0 status -7 (SIGBUS)" in line and "killed by a signal; SIGBUS is a memory-mapped file cut short" in line
    _, line = exit_status({0: -11, 1: -15})
    assert "rank 0 status -11 (SIGSEGV)" in line and "killed by a signal, with nothing printed" in line
    _, line = exit_status({0: 1, 1: -11})
    assert "rank 1 status -11 (SIGSEGV)" in line and "their output above says why" in line


BUS_ERROR = """
import sys, numpy as np, torch
from robe_dist import ops
np.save(sys.argv[1], np.arange(1 << 20, dtype=np.int64))
data = np.load(sys.argv[1], mmap_mode="r")
assert ops.set_bus_error_message("robe-train: rank 0: bus error (SIGBUS) reading the memory-mapped data")
with open(sys.argv[1], "r+b") as f:
    f.truncate(4096)  # as a data file rewritten under the run
print(int(data[-1]))  # the page is gone: SIGBUS
"""


@pytest.mark.skipif(not ops.has_cpp_extension(), reason="needs robe_dist._C")
def test_a_memory_mapped_file_cut_short_ends_the_process_with_one_line(tmp_path):
    """The process used to die of SIGBUS inside NumPy with nothing printed (a shell says "Bus error")."""
    done = subprocess.run([sys.executable, "-c", BUS_ERROR, str(tmp_path / "ids.npy")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == -signal.SIGBUS.value  # still killed by the signal, as torchrun expects
    assert done.stderr.strip().splitlines()[-1] == "robe-train: rank 0: bus error (SIGBUS) reading the memory-mapped data"
    assert done.stdout == ""
    # a SIGBUS sent from outside is not blamed on the data; the handler it replaced still runs
    sent = BUS_ERROR.replace("with open(", "import faulthandler, os; os.kill(os.getpid(), 7)\nwith open(").replace(
        "import sys,", "import faulthandler; faulthandler.enable()\nimport sys,")
    done = subprocess.run([sys.executable, "-c", sent, str(tmp_path / "ids.npy")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == -signal.SIGBUS.value
    assert "bus error (SIGBUS) reading" not in done.stderr and "Fatal Python error: Bus error" in done.stderr


STORE_GONE = """
import os, sys
if sys.argv[1] == "agent":
    import robe_dist.torchrun  # noqa: F401  (loads torch as the launcher does)
from torch.distributed import TCPStore
server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
client = TCPStore("127.0.0.1", server.port, is_master=False)
del server  # the rendezvous host's agent has left
try:
    client.compare_set("closed", "", "1")  # what an agent on another node does as it closes the rendezvous
except Exception as e:
    print(type(e).__name__)
print(os.environ.get("TORCH_CPP_LOG_LEVEL"))  # what its workers would inherit
"""


def test_an_agent_finding_the_rendezvous_store_gone_prints_no_cpp_frames():
    """Found with two agents of one job on one machine (--nnodes=2, c10d): after a user error the
    agent on the store's node left first, and the other printed 15 lines of C++ frames from torch's
    TCPStore after rank 0's one line. The workers still get the user's TORCH_CPP_LOG_LEVEL."""
    import os

    def run(kind, level):
        env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
        env.update({"TORCH_CPP_LOG_LEVEL": level} if level else {})
        done = subprocess.run([sys.executable, "-c", STORE_GONE, kind], capture_output=True, text=True, timeout=120, env=env)
        assert done.stdout.split() == ["DistNetworkError", str(level)]  # (the level its workers would inherit)
        return "frame #" in done.stderr

    assert run("plain", None)  # torch's own behaviour, which the launcher quiets
    assert not run("agent", None)
    assert run("agent", "INFO")  # a level the user set is kept
