"""One rank's failure stops every rank, with one message.

Every collective (gather, barrier, broadcast) waits for all processes: when one process fails (a
checkpoint write on the main process, a reward-server error, an out-of-memory), the others would wait
at their next collective until the backend's timeout (NCCL: 10-30 minutes), holding their GPUs. torchrun
stops the other workers of a failed one itself; launchers that start each rank on its own (srun, a
scheduler's array, processes started by hand) do not. So a failing rank writes one line into the shared
run dir (RUN_DIR/.rank_failures/rankN), and a watcher thread on every rank that finds another rank's
line prints it and ends its process with exit code 1.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

FOLDER = ".rank_failures"
FAILED_EXIT_CODE = 1


class RankFailures:
    """The run's failure board: `report` on the failing rank, `watch` on every rank."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, poll_s: float = 0.5) -> None:
        self.folder, self.rank, self.world_size, self.poll_s = run_dir / FOLDER, rank, world_size, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def clear(self) -> None:
        """Drop an earlier attempt's lines (a resumed run): only the main rank, before the first collective."""
        for f in self.folder.glob("rank*"):
            f.unlink(missing_ok=True)

    def report(self, err: BaseException) -> None:
        """This rank failed: its line for the other ranks (written atomically)."""
        first = (str(err).strip().splitlines() or [""])[0]
        line = f"rank {self.rank} of {self.world_size} failed: {type(err).__name__}: {first}"[:1000]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".rank{self.rank}.tmp"
            tmp.write_text(line + "\n")
            tmp.replace(self.folder / f"rank{self.rank}")
        except OSError:
            return  # the run dir itself failed: the launcher's own failure handling is all that is left
        # before this process exits (its peers' transports may then fail on their own): let the
        # watchers read the line first, so that every rank stops with the same message
        time.sleep(3 * self.poll_s)

    def other_failure(self) -> str | None:
        """Another rank's line, if one failed."""
        for f in sorted(self.folder.glob("rank*")):
            if f.name != f"rank{self.rank}":
                try:
                    return f.read_text().strip()
                except OSError:
                    continue
        return None

    def watch(self) -> None:
        """Start the watcher thread (a daemon: it never keeps a finished process alive)."""
        if self.world_size < 2 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rank-failures", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            line = self.other_failure()
            if line is not None:
                print(f"[rank {self.rank}] stopping: {line}", file=sys.stderr, flush=True)
                os._exit(FAILED_EXIT_CODE)  # the main thread may be blocked inside a collective

    def stop(self) -> None:
        self._stop.set()
