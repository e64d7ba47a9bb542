"""What several test modules share: the tiny run's overrides, an in-process run, the CLI's environment.

Test modules import from here, never from one another; fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]  # the checkout
CONF = ROOT / "conf"
# a two-epoch-capable run on the random tiny family: seconds on one CPU core
SMALL = [
    "model=tiny",
    "task=compression",
    "sampler.num_steps=4",
    "train.samples_per_epoch=16",
    "train.sample_batch_size=8",
    "train.train_batch_size=4",
    "train.samples_per_step=8",
    "train.save_images=4",
]
# a 4-epoch tiny run that checkpoints and evaluates every 2 epochs: what resume and run-dir tests kill,
# refuse and resume
RESUMABLE = [
    "model=tiny", "task=compression", "sampler.num_steps=4", "train.samples_per_epoch=8",
    "train.sample_batch_size=8", "train.train_batch_size=4", "train.samples_per_step=8",
    "train.save_images=0", "train.epochs=4", "train.checkpoint_every=2", "train.eval_every=2",
    "train.eval_seeds=1", "optimizer.lr=0.01",
]  # fmt: skip
# metrics that differ between two runs of the same config (wall clock), left out when runs are compared
TIMING = {
    "wallclock_s",
    "gpu_hours",
    "time_sample_s",
    "time_reward_s",
    "time_reward_wait_s",
    "time_train_s",
    "time_eval_s",
}


def run_in_process(overrides: list[str], run_dir: Path) -> list[dict]:
    """A training run through the library (rlcm_exp.training.build.train), without the CLI, with the
    callback the commands attach (RunSummary: held-out grids, summary figures, the before -> after line)."""
    from rlcm_exp.analysis.summary import RunSummary
    from rlcm_exp.training.build import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return train(cfg, run_dir, callbacks=[RunSummary()])


def compose_eval(overrides: list[str]):  # noqa: ANN201
    """The `evaluate` command's config composed from conf/evaluate.yaml."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def cli_env(tiny_cache: str) -> dict[str, str]:
    """The environment of a `python -m rlcm_exp...` subprocess: offline, the session's tiny models,
    one intra-op thread (as the test process itself)."""
    return {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# what `python -m rlcm_exp` imports before it parses its arguments (~10 s of CPU per fresh process on
# the 2-core machine): Entry's fork server imports them once per test process
ENTRY_PRELOAD = [
    "torch",
    "diffusers",
    "hydra",
    "rlcm_exp.configs",
    "rlcm_exp.training.build",
    "rlcm_exp.analysis.summary",
    "tests.helpers",
]
_FORK_SERVER: list = []  # the multiprocessing context, made on first use


def _entry_child(
    module: str,
    args: list[str],
    env: dict[str, str],
    cwd: str | None,
    logs: tuple[str, str],
    driver: str | None,
) -> None:
    """In a fresh child of the fork server: the environment, working folder, stdout and stderr files
    and argv that a new `python -m MODULE ARGS` process gets, then the module run as `-m` runs it (or
    `driver`, a script that calls the entry point). Its exit status (SystemExit code, a signal) is the
    child process's."""
    import atexit
    import runpy

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.path.insert(0, os.getcwd())  # as `python -m` puts the working folder first
    out, err = logs
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    try:
        if driver is None:
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", json.dumps(args)]
            exec(compile(driver, "<driver>", "exec"), {"__name__": "__main__"})  # noqa: S102
    finally:
        atexit._run_exitfuncs()  # a multiprocessing child skips them; a fresh interpreter runs them


class Entry:
    """`python -m rlcm_exp ARGS` (or another MODULE) as a real child process, forked from a server
    process that has already imported torch and the package (ENTRY_PRELOAD) instead of a fresh
    interpreter that imports them again: its own pid, environment, stdout/stderr (files) and exit status or signal, so SIGKILL,
    SIGTERM and exit codes are tested as they are on a fresh process. Imports at startup are not (the
    tests that run `python -m rlcm_exp` itself hold those: test_cli's smoke run, the README commands),
    nor variables read at import time (HF_HUB_OFFLINE, OMP_NUM_THREADS: the test process's, which
    conftest.py sets as cli_env does)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        driver: str | None = None,
        module: str = "rlcm_exp",
        cwd: Path | None = None,
    ) -> None:
        import multiprocessing
        import tempfile

        if not _FORK_SERVER:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(ENTRY_PRELOAD)
            _FORK_SERVER.append(ctx)
        self._logs = tempfile.TemporaryDirectory(prefix="entry")
        self.out, self.err = Path(self._logs.name) / "stdout", Path(self._logs.name) / "stderr"
        self.args = args
        self.proc = _FORK_SERVER[0].Process(
            target=_entry_child,
            args=(
                module,
                args,
                env,
                None if cwd is None else str(cwd),
                (str(self.out), str(self.err)),
                driver,
            ),
            daemon=True,  # one a failed test left running is killed when the test process exits
        )
        self.proc.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code (-N: killed by signal N), None while it runs."""
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Its exit code and output; past `timeout` seconds it is killed and TimeoutExpired raised."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise subprocess.TimeoutExpired(["rlcm_exp", *self.args], timeout or 0.0)
        stdout, stderr = (p.read_text() if p.is_file() else "" for p in (self.out, self.err))
        self._logs.cleanup()
        return subprocess.CompletedProcess(self.args, self.proc.exitcode, stdout, stderr)


def run_entry(
    args: list[str],
    env: dict[str, str],
    *,
    check: bool = False,
    timeout: float = 600,
    driver: str | None = None,
    module: str = "rlcm_exp",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` run to its end in a forked child (Entry); check: raise on a nonzero exit."""
    res = Entry(args, env, driver, module, cwd).wait(timeout)
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
    return res


def train_subprocess(
    run_dir: Path, tiny_cache: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    """The RESUMABLE run through the real entry point in its own process (run_entry), `extra` last."""
    args = [*RESUMABLE, *extra, f"hydra.run.dir={run_dir}"]
    return run_entry(args, cli_env(tiny_cache), check=check)


# the toy world at its smallest (one 8-image round per epoch, 2 steps): seconds per epoch on a CPU
TOY_SMALL = [
    "model=toy",
    "task=toy_alignment",
    "sampler.num_steps=2",
    "train.samples_per_epoch=8",
    "train.sample_batch_size=8",
    "train.train_batch_size=4",
    "train.samples_per_step=8",
    "train.save_images=0",
    "logger=none",
]


def read_all(sock: socket.socket, within_s: float) -> bytes:
    """What the server sends until it closes the connection (at most within_s seconds)."""
    sock.settimeout(within_s)
    data = b""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
WORDS = ["hello", "quartz", "Vinyl"]  # pairwise far apart: each misread as another scores below 0.3


def render(words: list[str | None], size: tuple[int, int] = (256, 96)) -> torch.Tensor:
    """Black words, 48 px DejaVu Sans, centred on white; None = a blank image. -> (B, 3, H, W) in [0, 1]."""
    font = ImageFont.truetype(str(FONT), 48)
    out = []
    for word in words:
        image = Image.new("RGB", size, "white")
        if word:
            ImageDraw.Draw(image).text(
                (size[0] // 2, size[1] // 2), word, fill="black", font=font, anchor="mm"
            )
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def free_port() -> int:
    """A port for a server or a rendezvous that nothing listens on now, drawn at random below the
    kernel's ephemeral range (32768-60999 on Linux): a port bound to 0 and closed may be handed to the
    next caller, another test's process, at once; connections' own ports never land below the range."""
    rng = random.Random()  # its own stream: the tests' seeded global RNGs would all draw the same port
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def run_ranks(
    cmd: list[str], env: dict[str, str], log_dir: Path, world: int = 2, timeout_s: float = 300
) -> list[tuple[int, str]]:
    """`cmd` started `world` times as the ranks of one gloo group (as srun starts them: RANK,
    WORLD_SIZE, MASTER_ADDR/PORT set, no torchrun), from the checkout's root. Outputs go to files in
    `log_dir` (a
    rank that fills a pipe nobody reads would block), every rank is killed on the way out, and a
    rendezvous whose port was taken in the meantime is retried on another one. Returns (exit code,
    stdout and stderr) per rank."""
    for _attempt in range(3):
        port, procs, logs = free_port(), [], []
        try:
            for rank in range(world):
                dist = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
                rank_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                rank_env.update({k: str(v) for k, v in dist.items()})
                logs.append((log_dir / f"rank{rank}.{port}.log").open("w+"))
                procs.append(
                    subprocess.Popen(cmd, env=rank_env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT)
                )
            deadline, timed_out = time.monotonic() + timeout_s, False
            for p in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
            outs = []
            for log in logs:
                log.seek(0)
                outs.append(log.read())
            assert not timed_out, f"a rank ran past {timeout_s} s:\n" + "\n".join(o[-2000:] for o in outs)
            if not any("address already in use" in o.lower() for o in outs):
                return [(p.returncode, o) for p, o in zip(procs, outs, strict=True)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
    raise RuntimeError(f"three rendezvous ports were taken: {outs[0][-2000:]}")


# the toy learning tests' evaluation (tests/test_learning.py, test_learning_flow.py): the run's base and
# trained policy on the 81 training compositions x 1 fixed seed, before and after only
EVAL = [
    "train.eval_every=1000",  # before and after only
    "task.eval_prompts.name=toy_train",
    "train.eval_seeds=1",
    "train.save_images=16",
    "train.checkpoint_every=0",
]


# the alignment tests: one detector decision on 81 images is 0.004, and their gains are a few hundredths
EVAL_4_SEEDS = [*(o for o in EVAL if not o.startswith("train.eval_seeds=")), "train.eval_seeds=4"]


def before_after(run_dir, key: str = "eval_reward_mean") -> tuple[float, float]:  # noqa: ANN001
    """A run's first and last held-out evaluation of `key` (eval.jsonl)."""
    from rlcm_exp.tracking import read_metrics

    evals = read_metrics(run_dir / "eval.jsonl")
    return evals[0][key], evals[-1][key]


def print_detector_parts(run_dir) -> None:  # noqa: ANN001
    """Which of the detector's thirds moved: the share of images with colour / shape / background right."""
    from rlcm_exp.toy.detector import PARTS

    for part in PARTS:
        first, last = before_after(run_dir, f"eval_reward/{part}")
        print(f"  {part} right {first:.3f} -> {last:.3f}")


def jpeg_cut(run_dir) -> float:  # noqa: ANN001
    """The held-out JPEG size's relative cut from the first to the last evaluation (rewards are -kB),
    printed."""
    before, after = before_after(run_dir)
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    return (before - after) / before


def detector_gain(run_dir) -> float:  # noqa: ANN001
    """The held-out detector score's gain from the first to the last evaluation, printed with its thirds."""
    before, after = before_after(run_dir)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    print_detector_parts(run_dir)
    return after - before


def first_update(trainer) -> tuple[dict, list[torch.Tensor]]:  # noqa: ANN001
    """The first round's update of a built Trainer: its metrics and every gradient the optimizer was
    about to apply (recorded at each optimizer step); the trainer is closed after."""
    grads: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        grads.extend(p.grad.detach().clone() for p in trainer.params)
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    traj, rewards, _ = trainer.sample_round(0)
    advantages, _ = trainer.advantages(traj.prompts, rewards["reward"])
    stats = trainer.update(0, traj, advantages)
    trainer.close()
    return stats, grads
