"""Two real CPU processes (torchrun, gloo) against one process with the same global batch and seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlcm_exp.tracking import read_metrics

from .helpers import SMALL, cli_env, free_port, run_entry, run_ranks

ROOT = Path(__file__).resolve().parents[1]

RUN = [*SMALL, "train.sample_batch_size=4", "train.epochs=2", "train.dump_rollouts=true"]


def launch(tiny_cache: str, run_dir: Path, processes: int, cwd: Path) -> None:
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:  # its own process, forked from one that imported the package (helpers.Entry)
        res = run_entry([*RUN, f"hydra.run.dir={run_dir}"], env, cwd=cwd)
        assert res.returncode == 0, res.stderr[-3000:]
        return
    # two: no hydra.run.dir: each process makes its own timestamped dir and must adopt the main one's
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "rlcm_exp",
        *RUN,
        f"hydra.run.dir={run_dir}/${{now:%f}}",
    ]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.subprocess
def test_two_gloo_processes_match_one_process(tiny_cache, tmp_path) -> None:
    launch(tiny_cache, tmp_path / "single", 1, tmp_path)
    launch(tiny_cache, tmp_path / "multi", 2, tmp_path)
    run_dirs = [p for p in (tmp_path / "multi").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, (
        f"expected one shared run dir, got {run_dirs}"
    )  # the other process's was removed
    multi = run_dirs[0]
    assert [r["epoch"] for r in read_metrics(multi / "metrics.jsonl")] == [
        0,
        1,
    ]  # written once, by the main process
    single = tmp_path / "single"
    for epoch in range(2):
        one = torch.load(single / "rollouts" / f"epoch{epoch:04d}_rank0.pt", weights_only=True)
        r0, r1 = (
            torch.load(multi / "rollouts" / f"epoch{epoch:04d}_rank{r}.pt", weights_only=True) for r in (0, 1)
        )
        # different noise per process
        assert not torch.allclose(r0["initial_noise_sum"], r1["initial_noise_sum"])
        # the union of per-process rounds is the single-process round, in rank order
        assert r0["prompts"] + r1["prompts"] == one["prompts"]
        torch.testing.assert_close(
            torch.cat([r0["initial_noise_sum"], r1["initial_noise_sum"]]), one["initial_noise_sum"]
        )
        if epoch == 0:  # same weights so far (later, DDP and one process take different minibatches)
            torch.testing.assert_close(
                torch.cat([r0["rewards"], r1["rewards"]]), one["rewards"], rtol=0, atol=1e-6
            )
            # advantages from the gathered rewards equal the single-process ones
            torch.testing.assert_close(
                torch.cat([r0["advantages"], r1["advantages"]]), one["advantages"], rtol=0, atol=1e-5
            )
    rec = read_metrics(single / "metrics.jsonl")[0]
    assert rec["reward_mean"] == read_metrics(multi / "metrics.jsonl")[0]["reward_mean"]


@pytest.mark.subprocess
def test_a_failure_on_one_rank_stops_every_rank_with_one_message(tmp_path) -> None:
    """Two gloo processes started on their own (as srun starts ranks; torchrun would stop the other
    worker itself): rank 1's reward fails in epoch 1 while rank 0 waits in the round's gather. Both
    stop at once, rank 0 with one line naming rank 1's error, not after the backend's timeout. Both
    start on an empty model cache: each builds the tiny family before the process group exists (on
    rank 1 of a started group transformers would write its text encoder without weights)."""
    args = [
        *RUN, "train.epochs=3", "train.dump_rollouts=false", "train.eval_every=0", "reward=custom",
        "reward._target_=tests.user_reward.fails_on_rank", "+reward.after_calls=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = cli_env(str(tmp_path / "empty_cache"))
    (code0, out0), (code1, out1) = run_ranks([sys.executable, "-m", "rlcm_exp", *args], env, tmp_path)
    assert code0 != 0 and code1 != 0, (out0[-2000:], out1[-2000:])
    message = "rank 1 of 2 failed: RuntimeError: reward server unreachable (injected on rank 1)"
    assert f"[rank 0] stopping: {message}" in out0, out0[-3000:]
    assert "Traceback" not in out0, out0[-3000:]
    assert "reward server unreachable" in out1


def test_a_synthetic_model_is_never_left_without_weights(tmp_path) -> None:
    """On rank 1 of a started gloo group transformers' save_pretrained writes nothing (seen in CI: a
    tiny family whose text encoder folders were empty). A build whose folders lack weights is refused
    with one line and leaves nothing behind, so no later run loads it; train() builds before the
    process group starts (the rank-failure test above starts both ranks on an empty cache)."""
    from rlcm_exp.errors import ConfigError
    from rlcm_exp.models.synthetic import _build_once

    def write(tmp: Path, tokenizer: object) -> None:  # what rank 1 wrote: a component folder, empty
        (tmp / "lcm" / "text_encoder").mkdir(parents=True)
        (tmp / "lcm" / "model_index.json").write_text("{}")

    with pytest.raises(ConfigError, match=r"wrote no weights for lcm/text_encoder: .*rank > 0"):
        _build_once(tmp_path / "cache", "tiny-test", write)
    assert list((tmp_path / "cache").iterdir()) == []
