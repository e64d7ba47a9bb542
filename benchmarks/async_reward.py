"""Does scoring rewards in a worker thread hide reward time behind sampling?

`python -m benchmarks.async_reward [--repeats 3]`: one sampling round of the tiny LCM family
(8 batches), scored by an in-process aesthetic reward (a CLIP vision tower built from a config,
random weights, 224 px, and the LAION head: the real code path, a model-sized cost), once inline
(train.reward_workers=0) and once asynchronously (reward_workers=1). Reports seconds per round,
sampling, reward and reward-wait time. Torch runs one thread per stream, so with 2 cores the
reward thread has a core of its own, as a reward on its own GPU would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from rlcm_exp.batching import plan_batches
from rlcm_exp.models import attach_lora, tiny_family
from rlcm_exp.policies.lcm import build_lcm_policy
from rlcm_exp.rewards.aesthetic import AestheticHead, aesthetic
from rlcm_exp.rl.ppo import PPOSettings
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker
from rlcm_exp.tokenizer import write_clip_tokenizer
from rlcm_exp.tracking import NullLogger
from rlcm_exp.train import Trainer, TrainSettings


def build_reward(folder: Path):
    write_clip_tokenizer(folder, ["a", "cat"], model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(folder)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        image_size=224,
        patch_size=16,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    save_file(AestheticHead().state_dict(), folder / "head.safetensors")
    return aesthetic(
        clip_model_id=None,
        clip_local_path=str(folder),
        head_url=None,
        head_sha256=None,
        head_local_path=str(folder / "head.safetensors"),
        batch_size=64,
    )


def round_time(workers: int, policy, reward, prompts, tmp: Path) -> dict[str, float]:
    acc = Accelerator(cpu=True)
    plan = plan_batches(
        world_size=1,
        samples_per_epoch=128,
        sample_batch_size=16,
        train_batch_size=16,
        samples_per_step=128,
        inner_epochs=1,
        transitions_per_trajectory=policy.num_transitions,
        timestep_fraction=1.0,
    )
    opt = torch.optim.Adam([p for p in policy.unet.parameters() if p.requires_grad])
    trainer = Trainer(
        policy=policy,
        reward_fn=reward,
        prompts=prompts,
        optimizer=opt,
        lr_scheduler=torch.optim.lr_scheduler.LinearLR(opt),
        params=[],
        tracker=PerPromptStatTracker(8, 8),
        plan=plan,
        settings=TrainSettings(reward_workers=workers),
        ppo=PPOSettings(),
        accelerator=acc,
        run_dir=tmp,
        seed=0,
        logger=NullLogger(),
    )
    start = time.perf_counter()
    _, _, timing = trainer.sample_round(0)
    timing["round_s"] = time.perf_counter() - start
    trainer.close()
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/async_reward.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        policy = build_lcm_policy(tiny_family(str(tmp_path / "tiny")), num_steps=4)
        attach_lora(policy.unet, 4, 4, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
        reward = build_reward(tmp_path / "clip")
        prompts = ["a cat", "a dog", "a red bird", "a blue fish"]
        round_time(1, policy, reward, prompts, tmp_path)  # warm-up
        results = {}
        for workers in (0, 1):
            runs = [round_time(workers, policy, reward, prompts, tmp_path) for _ in range(args.repeats)]
            results["async" if workers else "inline"] = {
                k: statistics.median(r[k] for r in runs) for k in runs[0]
            }
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
