"""The ranks of an `mx.distributed` ring group on one machine, started without a busy launcher.

`mlx.launch` relays each rank's output through a thread whose `select` also waits for the rank's
stdin pipe to become writable, which it always is: the threads never sleep. On this project's
2-core machine the launcher took 73 % of a core, and two ranks sweeping IOI pairs ran 1.05-1.14x
faster than one; started by hand, the same two ranks ran 1.9x faster (docs/scale.md). Here the
ranks write to the terminal themselves, and the launcher sleeps between looks at them.

Example:
    >>> launch(["mlxterp", "patch", "--pairs", "ioi.jsonl", "--metric", "logit_diff"], ranks=2)
    0
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from mlxterp.errors import InputError

POLL_SECONDS = 0.1  # how often the launcher looks at its ranks; they run meanwhile


def launch(command: Sequence[str], ranks: int, env: dict[str, str] | None = None) -> int:
    """Run `command` as `ranks` processes of one ring group over 127.0.0.1 (MLX_RANK and
    MLX_HOSTFILE set for `mx.distributed.init()`), with `env` added to their environment. When a
    rank fails, the others are stopped. Returns 0, or the first failing rank's exit status
    (128 + the signal for a rank killed by one).

    Raises:
        InputError: `ranks` below 1, or an empty command.

    Example:
        >>> launch([sys.executable, "sweep.py"], ranks=2, env={"OPENBLAS_NUM_THREADS": "1"})
        0
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise InputError(f"ranks={ranks!r}: give how many processes to start, a whole number from 1.")
    if not command:
        raise InputError("no command to launch: give it after '--', e.g. "
                         "mlxterp launch -n 2 -- mlxterp patch --pairs ioi.jsonl")
    hosts = [[f"127.0.0.1:{port}"] for port in _free_ports(ranks)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlxterp-ring-", delete=False) as hostfile:
        json.dump(hosts, hostfile)
    processes: list[subprocess.Popen] = []
    try:
        for rank in range(ranks):
            processes.append(subprocess.Popen(list(command), env={
                **os.environ, **(env or {}), "MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile.name}))
        return _wait(processes)
    finally:
        for process in processes:  # the failing rank's partners, those started before a failed
            if process.poll() is None:  # start, or all on Ctrl-C
                process.terminate()
        for process in processes:
            process.wait()
        os.unlink(hostfile.name)


def _wait(processes: list[subprocess.Popen]) -> int:
    """Sleep until every process has ended (0) or one has failed (its status)."""
    while True:
        codes = [process.poll() for process in processes]
        for rank, code in enumerate(codes):
            if code:
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                       else f"exited with code {code}")
                print(f"mlxterp launch: rank {rank} {how}; stopping the other ranks", file=sys.stderr,
                      flush=True)
                return 128 - code if code < 0 else code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_SECONDS)


def _free_ports(count: int) -> list[int]:
    """`count` loopback ports free now (each rank of the ring listens on its own)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()
