# %% [markdown]
# # The Python API on the tiny family (notebook-style: run as a script, or cell by cell in VS Code /
# Jupyter with jupytext). Random tiny weights: this shows the calls, not learning; for learning use
# the toy family (`model=toy task=toy_compression`, minutes on a CPU).
#
#     python experiments/api_example.py      # ~10 s on a 2-core CPU; writes outputs/api_example/

# %%
from pathlib import Path

import torch

import rlcm_exp

run_dir = Path("outputs/api_example")
overrides = ["model=tiny", "task=compression", "train.epochs=2", "sampler.num_steps=4"]
if not (run_dir / "checkpoints" / "final").is_dir():  # a second run of the script reuses the run
    records = rlcm_exp.run(overrides, run_dir=run_dir)  # trains in this process; records = metrics.jsonl

# %% what the run recorded: metrics per epoch, held-out evaluations (before and after), its config
rec = rlcm_exp.read_records(run_dir)
for m in rec["metrics"]:
    print(
        f"epoch {m['epoch']}: reward {m['reward_mean']:.4f}, {m['wallclock_s']:.1f} s, {m['reward_queries']} queries"
    )
print("held-out before -> after:", [round(e["eval_reward_mean"], 4) for e in rec["evals"]])
print("sampler:", rec["config"]["sampler"]["_target_"], rec["config"]["sampler"]["num_steps"], "steps")

# %% the trained policy (the run's model, sampler and LoRA): sample with your own prompts and seeds
policy = rlcm_exp.load_policy(run_dir)
images = policy.sample(["a red cat", "a blue dog"], [torch.Generator().manual_seed(s) for s in (0, 1)]).images
print("images:", tuple(images.shape), "in [0, 1]")  # (2, 3, 32, 32)

# %% the figures the run wrote: reward_vs_time.png, before_after.png (held-out, labelled)
print(sorted(p.name for p in run_dir.glob("*.png")))
