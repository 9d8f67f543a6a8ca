"""`python -m rawformer.distributed.launch -n 4 -- python train.py ...`: mpiexec, plus a closing line that
names the rank when one dies.

MPICH's hydra kills every rank the moment one exits abnormally and names only a PID ("PID 30309 RUNNING AT
host, EXIT CODE: 9"), not always the one that died first. Here each rank records its host and PID in
$RAWFORMER_RANK_DIR and holds a connection to this wrapper's Unix socket open while it lives
(faults.rank_table, called by DataParallel / Pipeline set-up); if the job fails the wrapper names the rank
whose connection closed first (or, for ranks on other hosts, the one whose PID the launcher printed):
`rawformer.distributed.launch: rank 1 (pid 30309 on vm) died; the job stopped (exit code 9)`.
Hangs are the Watchdog's business (it names the rank itself).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from rawformer.distributed.faults import RANK_DIR_ENV, SOCKET_NAME

_PID_PATTERNS = (re.compile(r"\bPID[ :]+(\d+)", re.IGNORECASE), re.compile(r"rank \d+ with PID (\d+)"))


def find_mpiexec() -> str | None:
    """mpiexec next to this Python (the pip MPICH installs it there), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec") or shutil.which("mpirun")


class _Deaths(threading.Thread):
    """Every rank of this host connects to a Unix socket in the rank directory and keeps the connection
    open for its whole life (faults.rank_table); the kernel closes it the instant the process ends, so the
    first connection to close is the rank that died: the launcher only kills the others after it noticed."""

    def __init__(self, rank_dir: str):
        super().__init__(daemon=True)
        self.path = os.path.join(rank_dir, SOCKET_NAME)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1024)
        self.order: list[list[dict]] = []  # ranks whose connection closed, one list per wake-up
        self.done = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        entries: dict[socket.socket, bytes] = {}
        while not self.done.is_set():
            closed = []
            for key, _ in sel.select(timeout=0.1):
                if key.fileobj is self.server:
                    conn, _ = self.server.accept()
                    entries[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                data = conn.recv(4096)
                if data:
                    entries[conn] += data
                    continue
                sel.unregister(conn)
                conn.close()
                try:
                    closed.append(json.loads(entries.pop(conn).decode()))
                except ValueError:  # closed before it said who it was
                    pass
            if closed:
                self.order.append(closed)
        sel.close()
        self.server.close()


def launch(n: int, command: Sequence[str], mpiexec: str | None = None, extra: Sequence[str] = ()) -> int:
    """Run `command` on `n` ranks, echo its output, on failure say which rank died; returns the exit code."""
    exe = mpiexec or find_mpiexec()
    if exe is None:
        raise FileNotFoundError("no mpiexec found: install the mpi extra (pip install 'rawformer[mpi]')")
    with tempfile.TemporaryDirectory(prefix="rawformer-ranks-") as rank_dir:
        env = dict(os.environ, **{RANK_DIR_ENV: rank_dir})
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        deaths = _Deaths(rank_dir)
        deaths.start()
        proc = subprocess.Popen(
            [exe, "-n", str(n), *extra, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        pids: list[int] = []
        named = False
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            named |= line.startswith("rawformer.distributed:")
            for pat in _PID_PATTERNS:
                pids += [int(p) for p in pat.findall(line)]
        code = proc.wait()
        deaths.done.set()
        deaths.join()
        if code != 0 and not named:
            # first choice: the rank seen stopping first on this host; else the PID the launcher named
            first = deaths.order[0] if deaths.order and len(deaths.order[0]) < n else []
            if not first:
                table = {}
                for f in Path(rank_dir).glob("rank*.json"):
                    entry = json.loads(f.read_text())
                    table[entry["pid"]] = entry
                first = [table[p] for p in dict.fromkeys(pids) if p in table]
            if first:
                who = ", ".join(f"rank {d['rank']} (pid {d['pid']} on {d['host']})" for d in first)
                print(
                    f"rawformer.distributed.launch: {who} died; the job stopped (exit code {code})",
                    flush=True,
                )
            else:
                print(f"rawformer.distributed.launch: the job failed (exit code {code})", flush=True)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawformer.distributed.launch", description=__doc__)
    parser.add_argument("-n", type=int, required=True, help="number of ranks")
    parser.add_argument("--mpiexec", help="the mpiexec to use (default: next to python, else on PATH)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command after --")
    return launch(args.n, cmd, args.mpiexec)


if __name__ == "__main__":
    raise SystemExit(main())
