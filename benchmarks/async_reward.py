"""Does scoring rewards in a worker thread hide reward time behind sampling?

`python -m benchmarks.async_reward [--repeats 3]`: one sampling round of the tiny LCM family
(8 batches), scored by an in-process aesthetic reward (a CLIP vision tower built from a config,
random weights, 224 px, and the LAION head: the real code path, a model-sized cost), once inline
(train.reward_workers=0) and once asynchronously (reward_workers=1). Reports seconds per round,
sampling, reward and reward-wait time. Torch runs one thread per stream, so with 2 cores the
reward thread has a core of its own, as a reward on its own GPU would.

The trainer is built by the production composition root (`rlcm_exp.training.build.build_trainer`)
from the project's config; only `Trainer.sample_round` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from rlcm_exp.configs import compose
from rlcm_exp.rewards.aesthetic import AestheticHead
from rlcm_exp.tokenizer import write_clip_tokenizer
from rlcm_exp.training.build import build_trainer, make_accelerator

# A CLIP whose image tower costs what a real reward model costs per image (224 px, 6 layers);
# the text tower is never run by the aesthetic reward and is as small as CLIP allows.
CLIP_VISION: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "image_size": 224,
    "patch_size": 16,
}
CLIP_TEXT: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
CLIP_TEXT |= {"num_attention_heads": 2, "max_position_embeddings": 16}

# 128 trajectories in 8 sampling batches of 16 (the tiny LCM, 4 steps), LoRA rank 4
ROUND = [
    "model=tiny",
    "task=compression",
    "task.prompts.name=simple_animals",
    "algo=rlcm",
    "sampler.num_steps=4",
    "algo.lora.rank=4",
    "algo.lora.alpha=4",
    "train.samples_per_epoch=128",
    "train.sample_batch_size=16",
    "train.train_batch_size=16",
    "train.samples_per_step=128",
    "device=cpu",
    "logger=none",
]


def write_reward_model(folder: Path) -> list[str]:
    """Save the CLIP and a LAION head under `folder`; return the overrides of `reward=aesthetic` on them."""
    write_clip_tokenizer(folder, ["a", "cat"], model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(folder)
    text = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = CLIPConfig(text_config={**CLIP_TEXT, **text}, vision_config=CLIP_VISION, projection_dim=768)
    CLIPModel(config).save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    save_file(AestheticHead().state_dict(), folder / "head.safetensors")
    return [
        "reward=aesthetic",
        "reward.clip_model_id=null",
        f"reward.clip_local_path={folder}",
        "reward.head_url=null",
        "reward.head_sha256=null",
        f"reward.head_local_path={folder / 'head.safetensors'}",
        "reward.batch_size=64",
    ]


def round_times(workers: int, overrides: list[str], repeats: int, run_dir: Path) -> dict[str, float]:
    """Median seconds of `repeats` sampling rounds (after one warm-up round) with `workers` reward threads."""
    cfg = compose("config", [*overrides, f"train.reward_workers={workers}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, run_dir, make_accelerator(cfg))
    runs = []
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            _, _, timing = trainer.sample_round(0)
            timing["round_s"] = time.perf_counter() - start
            if i > 0:  # round 0 warms up
                runs.append(timing)
    finally:
        trainer.close()
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/async_reward.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        overrides = [*ROUND, f"model.cache_dir={tmp_path / 'tiny'}", *write_reward_model(tmp_path / "clip")]
        for workers in (0, 1):
            name = "async" if workers else "inline"
            results[name] = round_times(workers, overrides, args.repeats, tmp_path / name)
    inline, asyn = results["inline"], results["async"]
    results["speedup"] = inline["round_s"] / asyn["round_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| mode | round s | sampling s | reward s | reward wait s |\n|---|---|---|---|---|")
    for name in ("inline", "async"):
        r = results[name]
        print(
            f"| {name} | {r['round_s']:.2f} | {r['time_sample_s']:.2f} | {r['time_reward_s']:.2f} | "
            f"{r['time_reward_wait_s']:.2f} |"
        )
    print(f"speed-up of the sampling+reward phase: {results['speedup']:.2f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
