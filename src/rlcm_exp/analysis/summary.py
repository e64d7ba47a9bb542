"""The end-of-run summary in the run dir: reward_vs_time.png, before_after.png and one printed line;
and the held-out images each evaluation keeps for it (RUN/eval/).

An evaluation's grid ("snapshot"): up to GRID_PROMPTS images, one per held-out prompt first (seed 0
of each prompt, then seed 1, ...), each labelled with its prompt, seed and the prompt's mean reward
over the evaluation's seeds. Every evaluation draws its own in RUN/eval/epoch_NNNN.png (NNNN: epochs
done); the first one's tensors are kept too (RUN/eval/epoch_0000.pt), so that before_after.png of a
resumed run still shows the run's real "before".

`RunSummary` is the callback that does both during a run; the commands (python -m rlcm_exp,
rlcm_exp.run) attach it, so the training library itself never imports this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlcm_exp.analysis.figures import before_after_grid, reward_vs_time_figure
from rlcm_exp.analysis.runs import read_evals, run_title
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.callbacks import Callback

GRID_PROMPTS = 8  # images per row of before_after.png


def select_eval_images(
    res: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int], epochs_done: int
) -> dict[str, Any]:
    """The snapshot of one held-out evaluation (`evaluate_policy`'s result for `prompts` x `seeds`,
    whose images are its first jobs in prompt-major order)."""
    images = res["eval_images"]
    jobs = [(p, s) for p in prompts for s in seeds][: len(images)]
    # distinct prompts first: job i is (prompt i // len(seeds), seed i % len(seeds))
    order = sorted(range(len(jobs)), key=lambda i: (i % len(seeds), i // len(seeds)))[:GRID_PROMPTS]
    per_prompt = res.get("eval_per_prompt", {})
    return {
        "epochs_done": epochs_done,
        "images": images[order].float().cpu(),
        "prompts": [jobs[i][0] for i in order],
        "seeds": [int(jobs[i][1]) for i in order],
        "rewards": [float(per_prompt.get(jobs[i][0], float("nan"))) for i in order],
        "eval_reward_mean": float(res["eval_reward_mean"]),
    }


def save_eval_images(folder: Path, snap: dict[str, Any], tensors: bool = False) -> None:
    """RUN/eval/epoch_NNNN.png (labelled) and, with `tensors`, epoch_NNNN.pt (images as uint8)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{snap['epochs_done']:04d}"
    before_after_grid(
        [snap], folder / f"{name}.png", title=f"{run_title(folder.parent)}: held-out evaluation"
    )
    if tensors:
        data = {**snap, "images": (snap["images"].clamp(0, 1) * 255).round().to(torch.uint8)}
        torch.save(data, folder / f"{name}.pt")


def load_eval_images(folder: Path, epochs_done: int = 0) -> dict[str, Any] | None:
    """The snapshot saved by `save_eval_images(..., tensors=True)`, None when there is none."""
    import torch

    path = folder / f"epoch_{epochs_done:04d}.pt"
    if not path.is_file():
        return None
    data = torch.load(path, weights_only=True)
    return {**data, "images": data["images"].float() / 255}


def write_summary(
    run_dir: Path, before: dict[str, Any] | None = None, after: dict[str, Any] | None = None
) -> str:
    """Writes reward_vs_time.png (training reward and held-out reward against wall-clock seconds) and,
    given the first and last evaluation's snapshots (same prompts and seeds), before_after.png.
    Returns the line it prints: reward before -> after."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = read_evals(run_dir)
    title = run_title(run_dir)
    reward_vs_time_figure(records, evals, run_dir / "reward_vs_time.png", title=title)
    if before is not None and after is not None:
        before_after_grid([before, after], run_dir / "before_after.png", title=f"{title}: before / after")
    return summary_line(records, evals)


def summary_line(records: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> str:
    """Training-round mean reward first -> last; with two evaluations or more, the held-out reward and
    each of its parts (eval_reward/<part>, e.g. the detector's colour / shape / background) too."""
    line = (
        f"reward (training round mean): {records[0]['reward_mean']:.4f} -> {records[-1]['reward_mean']:.4f}"
    )
    if len(evals) >= 2:
        line += f"; held-out: {evals[0]['eval_reward_mean']:.4f} -> {evals[-1]['eval_reward_mean']:.4f}"
        parts = [k for k in evals[0] if k.startswith("eval_reward/") and k in evals[-1]]
        line += "".join(
            f", {k[len('eval_reward/') :]} {evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in parts
        )
    return line


class RunSummary(Callback):
    """Keeps each held-out evaluation's grid (RUN/eval/) and, at the end of a run that trained an
    epoch, writes the summary figures and prints the before -> after line (main process only)."""

    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}  # "first" / "last" evaluation's snapshot
        self.trained = False

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        self.trained = True

    def on_evaluation(self, trainer: Any, epochs_done: int, result: dict[str, Any]) -> None:
        seeds = list(range(trainer.settings.eval_seeds))
        snap = select_eval_images(result, trainer.eval_prompts, seeds, epochs_done)
        folder = trainer.run_dir / "eval"
        save_eval_images(folder, snap, tensors=epochs_done == 0)
        if "first" not in self.images:  # after a resume the first evaluation ran in an earlier process
            self.images["first"] = snap if epochs_done == 0 else load_eval_images(folder) or snap
        self.images["last"] = snap

    def on_fit_end(self, trainer: Any) -> None:
        if not (trainer.accelerator.is_main_process and self.trained):
            return
        run_dir = trainer.run_dir
        print(write_summary(run_dir, self.images.get("first"), self.images.get("last")))
        after = f", {run_dir / 'before_after.png'} (top: before, bottom: after)" if self.images else ""
        print(f"plots: {run_dir / 'reward_vs_time.png'}" + after)
