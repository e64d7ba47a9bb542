"""Images from a model family's sampler, optionally with a trained LoRA, written as PNGs with a
samples.json (what `python -m rlcm_exp.sample` runs).

samples.json is also the list of what a sampling run wrote: a folder that already holds samples is
refused unless `overwrite=true`, and then only the earlier samples.json and the PNGs it lists are
replaced; any other file there is kept, and a PNG of the same name that it does not list is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.heldout import seeded_generators
from rlcm_exp.evaluation.png import save_png
from rlcm_exp.evaluation.runs import config_for_checkpoint, load_lora, pick_device
from rlcm_exp.policies.build import build_policy

SAMPLES_FILE = "samples.json"


def image_name(index: int) -> str:
    return f"{index:04d}.png"


MAX_IMAGES_PER_PROMPT = 100_000
MAX_IMAGES = 1_000_000  # a request's jobs are listed before the first image: bounded before allocation
MAX_BATCH_SIZE = 1024  # images per sampler forward


def check_sizes(images_per_prompt: int, batch_size: int, prompts: int) -> None:
    """Bounds on what a request allocates, checked before anything is (a ConfigError naming the key)."""
    if images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise ConfigError(f"images_per_prompt={images_per_prompt}: at most {MAX_IMAGES_PER_PROMPT:,}")
    if images_per_prompt * prompts > MAX_IMAGES:
        raise ConfigError(
            f"images_per_prompt={images_per_prompt} x {prompts} prompts = {images_per_prompt * prompts:,} images: "
            f"at most {MAX_IMAGES:,} per request; split it into several"
        )
    if batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"batch_size={batch_size}: at most {MAX_BATCH_SIZE} images per sampler forward")


def check_request(cfg: DictConfig) -> list[str]:
    """The prompts, or a ConfigError naming the key: every check that needs no model, so a bad
    request is refused before anything loads."""
    prompts = cfg.get("prompts")
    if not isinstance(prompts, list | ListConfig) or not prompts:
        raise ConfigError(
            f"prompts={prompts!r}: give a non-empty list of prompts to sample, e.g. prompts='[a cat,a dog]'"
        )
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"prompts={list(prompts)!r}: every prompt must be a non-empty string")
    for key, low in (("images_per_prompt", 1), ("batch_size", 1), ("seed", None)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"{key}={value!r}: must be an integer" + (f" >= {low}" if low else ""))
    check_sizes(int(cfg.images_per_prompt), int(cfg.batch_size), len(prompts))
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ConfigError(f"overwrite={cfg.get('overwrite')!r}: must be true or false")
    return [str(p) for p in prompts]


def read_listing(out: Path) -> list[str]:
    """The PNGs an earlier sampling run listed in out/samples.json ([] when there is none)."""
    path = out / SAMPLES_FILE
    if not os.path.lexists(path):
        return []
    try:
        names = [record["file"] for record in json.loads(path.read_text())]
        if not all(isinstance(n, str) and n == Path(n).name and n.endswith(".png") for n in names):
            raise ValueError("a 'file' entry is not a PNG name inside the folder")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(
            f"out={out}: {SAMPLES_FILE} there was not written by rlcm_exp.sample ({type(err).__name__}: "
            f"{err}), so its files cannot be told from yours. Choose another out=DIR."
        ) from err
    return names


def earlier_outputs(out: Path, names: list[str], overwrite: bool) -> list[str]:
    """The files of an earlier sampling run in `out` that this one replaces (samples.json and the
    PNGs it lists), or a ConfigError: `out` holds samples and overwrite is off, or a file this run
    would write is not an earlier run's."""
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder: choose another out=DIR")
    clashes = [n for n in [SAMPLES_FILE, *names] if os.path.lexists(out / n)]
    if not clashes:
        return []
    shown = ", ".join(clashes[:3]) + (", ..." if len(clashes) > 3 else "")
    if not overwrite:
        raise ConfigError(
            f"out={out} already holds samples ({shown}); sampling again would overwrite them. Choose "
            "another out=DIR, or set overwrite=true to replace that earlier run's samples.json and the "
            "PNGs it lists (other files there are kept)."
        )
    listed = read_listing(out)
    foreign = [n for n in names if os.path.lexists(out / n) and (n not in listed or not (out / n).is_file())]
    if foreign:
        raise ConfigError(
            f"out={out}: overwrite=true replaces only samples.json and the PNGs it lists, but "
            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} there "
            f"{'is' if len(foreign) == 1 else 'are'} not listed. Nothing was written: move them away or "
            "choose another out=DIR."
        )
    return listed


def write_listing(out: Path, records: list[dict[str, Any]]) -> None:
    """samples.json whole or not at all: it is what a later overwrite=true trusts."""
    tmp = out / (SAMPLES_FILE + ".part")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out / SAMPLES_FILE)


# taken from the run's config.yaml when checkpoint is a run dir, unless the command line sets them
SAMPLE_GROUPS = ("model", "sampler")


def sample_images(cfg: DictConfig, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """One PNG per (prompt, image) and samples.json (prompt, seed, steps, sampler, checkpoint per image)
    in `cfg.out`. Image i uses seed cfg.seed + i with its own generator, so it does not depend on the
    batch it was drawn in. Given a run dir (or a checkpoint inside one), the model and sampler are the
    run's, except what `overrides` (the command line) sets; with overrides=None, cfg is used as it is."""
    prompts = check_request(cfg)
    if overrides is not None:
        cfg, _ = config_for_checkpoint(cfg, overrides, SAMPLE_GROUPS)
    jobs = [(p, cfg.seed + i) for i, p in enumerate(p for p in prompts for _ in range(cfg.images_per_prompt))]
    out = Path(cfg.out)
    replaced = earlier_outputs(out, [image_name(i) for i in range(len(jobs))], cfg.get("overwrite", False))
    device = pick_device(cfg.device)
    policy = build_policy(cfg, device)  # refuses a resolution the VAE cannot produce before loading
    checkpoint = load_lora(policy, cfg.checkpoint, cfg.get("ema", False)) if cfg.checkpoint else None
    out.mkdir(parents=True, exist_ok=True)
    for name in replaced:  # only now that the model loaded: a failed start keeps the earlier samples
        (out / name).unlink(missing_ok=True)
    records: list[dict[str, Any]] = []
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        first = len(records)
        records += [
            {
                "file": image_name(first + k),
                "prompt": prompt,
                "seed": seed,
                "steps": policy.num_steps,
                "sampler": type(policy).__name__,
                "checkpoint": str(checkpoint) if checkpoint else None,
            }
            for k, (prompt, seed) in enumerate(chunk)
        ]
        write_listing(out, records)  # listed before written: a killed run leaves no unlisted PNG
        images = policy.sample([p for p, _ in chunk], seeded_generators([s for _, s in chunk], device)).images
        for record, image in zip(records[first:], images, strict=True):
            save_png(image, out / record["file"])
    print(f"wrote {len(records)} images to {out}")
    return records
