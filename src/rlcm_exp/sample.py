"""`python -m rlcm_exp.sample model=toy sampler.num_steps=4 prompts='[a red circle on a blue background]' out=DIR`

Writes one PNG per image and samples.json (prompt, seed, steps, sampler, checkpoint per image).
Each image has its own seeded generator, so an image does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import save_image

from rlcm_exp.__main__ import CONF_DIR, find_config_error
from rlcm_exp.checkpoint import resolve_lora_folder


def sample(cfg: DictConfig) -> list[dict]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    family = instantiate(cfg.model)
    policy = instantiate(cfg.sampler, _partial_=True)(family=family, device=device)
    checkpoint = None
    if cfg.checkpoint:
        checkpoint = resolve_lora_folder(cfg.checkpoint)
        policy.unet.load_lora_adapter(
            str(checkpoint), prefix="unet", weight_name="pytorch_lora_weights.safetensors"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (p, cfg.seed + i) for i, p in enumerate(p for p in cfg.prompts for _ in range(cfg.images_per_prompt))
    ]
    records: list[dict] = []
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        generators = [torch.Generator(device).manual_seed(seed) for _, seed in chunk]
        images = policy.sample([p for p, _ in chunk], generators).images
        for (prompt, seed), image in zip(chunk, images, strict=True):
            name = f"{len(records):04d}.png"
            save_image(image, out / name)
            records.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "seed": seed,
                    "steps": policy.num_steps,
                    "sampler": type(policy).__name__,
                    "checkpoint": str(checkpoint) if checkpoint else None,
                }
            )
    (out / "samples.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} images to {out}")
    return records


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
