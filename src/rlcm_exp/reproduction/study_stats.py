"""The study's statistics over seeds: bootstrap intervals of a seed mean, of a time to a threshold
and of a ratio of two such times, and image statistics read off the saved sample grids.

Every interval is a 95% percentile bootstrap over seeds: resample the seeds of a group with
replacement (each group independently), recompute the statistic, take the 2.5th and 97.5th
percentiles of its draws (`inverted_cdf`: actual draws, so an infinite "never reached" stays one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlcm_exp.analysis.runs import Run
from rlcm_exp.reproduction.study import first_crossing, smoothed

DRAWS = 2000  # bootstrap resamples
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the seeds as they are
    lo: float
    hi: float
    bound: str = ""  # ">=" / "<=": a censored ratio (one side never reached the threshold), else ""

    def text(self, digits: int = 3) -> str:
        """ "v [lo, hi]", inf as "never" (not reached within the budget), a censored value as ">= v"."""
        if np.isnan(self.value):
            return "none (neither reached the threshold)"
        b = f"{self.bound} " if self.bound else ""
        return f"{b}{_num(self.value, digits)} [{_num(self.lo, digits)}, {_num(self.hi, digits)}]"


def _num(x: float, digits: int) -> str:
    if np.isnan(x):
        return "-"
    if np.isinf(x):
        return "never" if x > 0 else "-never"
    return f"{x:.{digits}g}"


def percentile_interval(draws: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    finite_or_inf = draws[~np.isnan(draws)]
    if len(finite_or_inf) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite_or_inf, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap(
    groups: Sequence[int], stat: Callable[..., float], draws: int = DRAWS, seed: int = 0
) -> Interval:
    """`stat(idx_1, ..., idx_k)` on index arrays into k groups of sizes `groups`, and its interval."""
    rng = np.random.default_rng(seed)
    value = stat(*[np.arange(n) for n in groups])
    samples = np.array([stat(*[rng.integers(n, size=n) for n in groups]) for _ in range(draws)], dtype=float)
    lo, hi = percentile_interval(samples)
    return Interval(float(value), lo, hi)


@dataclass(frozen=True)
class Group:
    """Seeds of one (task, algorithm, setting) as (seeds, epochs) arrays over the epochs all finished."""

    runs: list[Run]
    x: dict[str, np.ndarray]  # time axes: wallclock_s, gpu_hours, reward_queries
    reward: np.ndarray

    @property
    def n(self) -> int:
        return len(self.runs)


AXES = ("wallclock_s", "gpu_hours", "reward_queries")


def make_group(runs: Sequence[Run]) -> Group:
    n = min(len(r.records) for r in runs)
    arr = lambda key: np.array([[rec[key] for rec in r.records[:n]] for r in runs], dtype=float)  # noqa: E731
    return Group(list(runs), {k: arr(k) for k in AXES}, arr("reward_mean"))


def crossing(g: Group, idx: np.ndarray, axis: str, threshold: float, smooth: int) -> float:
    """Seed-mean time (on `axis`) at which the smoothed seed-mean reward first reaches `threshold`; inf: never."""
    t = first_crossing(g.x[axis][idx].mean(0), smoothed(g.reward[idx].mean(0), smooth), threshold)
    return float("inf") if t is None else t


def time_interval(g: Group, axis: str, threshold: float, smooth: int) -> Interval:
    return bootstrap([g.n], lambda i: crossing(g, i, axis, threshold, smooth))


def ratio_interval(num: Group, den: Group, axis: str, threshold: float, smooth: int) -> Interval:
    """Time of `num` / time of `den` to the threshold. A group that never reached it is censored at its
    last time: only `num` censored gives a lower bound on the ratio (`Interval.bound` ">="), only `den`
    an upper bound ("<="); neither reaching it gives nan."""

    def stat(i: np.ndarray, j: np.ndarray) -> float:
        a, b = crossing(num, i, axis, threshold, smooth), crossing(den, j, axis, threshold, smooth)
        if np.isinf(a) and np.isinf(b):
            return float("nan")
        a = float(num.x[axis][i].mean(0)[-1]) if np.isinf(a) else a
        b = float(den.x[axis][j].mean(0)[-1]) if np.isinf(b) else b
        return a / b

    ci = bootstrap([num.n, den.n], stat)
    every = np.arange(num.n), np.arange(den.n)
    a, b = crossing(num, every[0], axis, threshold, smooth), crossing(den, every[1], axis, threshold, smooth)
    bound = ">=" if np.isinf(a) and not np.isinf(b) else "<=" if np.isinf(b) and not np.isinf(a) else ""
    return Interval(ci.value, ci.lo, ci.hi, bound)


def final_interval(g: Group, smooth: int) -> Interval:
    """Seed mean of each run's smoothed final reward."""
    finals = np.array([smoothed(r, smooth)[-1] for r in g.reward])
    return bootstrap([g.n], lambda i: float(finals[i].mean()))


def per_seed_interval(values: Sequence[float]) -> Interval:
    v = np.asarray(values, dtype=float)
    return bootstrap([len(v)], lambda i: float(v[i].mean()))


def difference_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) - mean(b), seeds resampled independently."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bootstrap([len(va), len(vb)], lambda i, j: float(va[i].mean() - vb[j].mean()))


def mean_ratio_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) / mean(b), seeds resampled independently."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bootstrap([len(va), len(vb)], lambda i, j: float(va[i].mean() / vb[j].mean()))


def curve_band(g: Group, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, lo, hi) of the seed-mean reward at each epoch, x the seed-mean of `axis`."""
    rng = np.random.default_rng(0)
    draws = np.stack([g.reward[rng.integers(g.n, size=g.n)].mean(0) for _ in range(DRAWS)])
    tail = (1 - LEVEL) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail], axis=0)
    return g.x[axis].mean(0), g.reward.mean(0), lo, hi


def verdict(ci: Interval, better_than: float = 1.0) -> str:
    """ "holds" when the whole interval is above `better_than`, "does not hold" when it is below,
    else "inconclusive at this power"."""
    if np.isnan(ci.lo) or np.isnan(ci.hi):
        return "inconclusive at this power"
    if ci.lo > better_than and ci.bound != "<=":  # a censored upper bound says nothing of the low side
        return "holds"
    if ci.hi < better_than and ci.bound != ">=":
        return "does not hold"
    return "inconclusive at this power"


def contains(ci: Interval, value: float) -> bool:
    """Whether `value` is inside the interval (a censored side open: ">=" has no upper end)."""
    return (ci.lo <= value or ci.bound == "<=") and (value <= ci.hi or ci.bound == ">=")


# ---------------------------------------------------------------------------- saved sample grids


def split_grid(grid: np.ndarray, count: int, padding: int = 2) -> np.ndarray:
    """The (count, H, W, 3) images of a torchvision `save_image` grid (nrow = ceil(sqrt(count)))."""
    ncol = int(np.ceil(np.sqrt(count)))
    side = (grid.shape[1] - padding) // ncol - padding
    out = []
    for k in range(count):
        r, c = divmod(k, ncol)
        y, x = padding + r * (side + padding), padding + c * (side + padding)
        out.append(grid[y : y + side, x : x + side])
    return np.stack(out)


def diversity(images: np.ndarray, size: int = 8) -> float:
    """Mean pairwise RMS distance between the images, each block-averaged to size x size (colours in [0, 1])."""
    n, h, w, ch = images.shape
    small = images.reshape(n, size, h // size, size, w // size, ch).mean(axis=(2, 4)).reshape(n, -1)
    d = np.sqrt(((small[:, None] - small[None]) ** 2).mean(-1))
    return float(d[np.triu_indices(n, 1)].mean()) if n > 1 else float("nan")


def describe_images(images: np.ndarray) -> dict[str, float]:
    """Plain statistics of a batch (colours in [0, 1]): luminance, saturation, the share of pixels
    unlike the image's border (its shape), and the mean within-image colour std (texture)."""
    lum = images @ np.array([0.299, 0.587, 0.114])
    sat = images.max(-1) - images.min(-1)
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    foreground = np.abs(images - background).max(-1) > 0.2
    return {
        "luminance": float(lum.mean()),
        "saturation": float(sat.mean()),
        "foreground": float(foreground.mean()),
        "texture": float(images.std(axis=(1, 2)).mean()),
    }


def image_stats(grid: np.ndarray, captions: list[str], detector: Callable[..., Any]) -> dict[str, float]:
    """Diversity, the detector's fidelity to the captions and `describe_images` of one saved grid."""
    import torch

    images = split_grid(grid, len(captions))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()
    fidelity = float(detector(tensor, captions)["reward"].mean())
    return {"diversity": diversity(images), "fidelity": fidelity, **describe_images(images)}
