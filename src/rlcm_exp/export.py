"""`python -m rlcm_exp.export RUN_DIR [--format lora|pipeline] [--out DIR]`

Writes what a run learned as something diffusers loads without this package: a LoRA folder
(`pipe.load_lora_weights(DIR)`) or a standalone pipeline with the LoRA fused in
(`DiffusionPipeline.from_pretrained(DIR)`), each with a model card (base model, task, reward,
steps, final metrics).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from rlcm_exp.checkpoint import resolve_lora_folder
from rlcm_exp.errors import ConfigError
from rlcm_exp.tracking import read_metrics


def model_card(run_dir: Path, kind: str) -> str:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    member = "lcm" if "lcm" in cfg.sampler._target_ else "diffusion"
    source = cfg.model.get(member) or {}
    base = source.get("local_path") or source.get("hub_id") or cfg.model.get("name", "?")
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    last = records[-1] if records else {}
    first = records[0] if records else {}
    lines = [
        f"# {cfg.algo.name.upper()} fine-tune ({kind})",
        "",
        f"- base model: `{base}` (family `{cfg.model.get('name', '?')}`, member `{member}`)",
        f"- algorithm: {cfg.algo.name}; sampler `{cfg.sampler._target_.rsplit('.', 1)[-1]}`, "
        f"steps {cfg.sampler.num_steps}, guidance {cfg.sampler.guidance_scale}",
        f"- task: {cfg.task.name}; reward `{cfg.reward._target_}`",
        f"- LoRA: rank {cfg.algo.lora.rank}, alpha {cfg.algo.lora.alpha}, modules {list(cfg.algo.lora.target_modules)}",
        f"- trained epochs: {len(records)}; reward {first.get('reward_mean', float('nan')):.4f} -> "
        f"{last.get('reward_mean', float('nan')):.4f}; GPU-hours {last.get('gpu_hours', 0.0):.4f}; "
        f"reward queries {last.get('reward_queries', 0)}",
        f"- seed {cfg.seed}; code `{(run_dir / 'git_commit.txt').read_text().strip() if (run_dir / 'git_commit.txt').is_file() else '?'}`",
        "",
        "Trained with rlcm-exp. Load with diffusers:",
        "",
        "```python",
        "pipe.load_lora_weights(DIR)  # LoRA export"
        if kind == "lora"
        else "pipe = DiffusionPipeline.from_pretrained(DIR)",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(run_dir: str | Path, fmt: str = "lora", out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} is not a run dir (no config.yaml): give the folder a training run wrote"
        )
    lora = resolve_lora_folder(run_dir)
    target = Path(out) if out else run_dir / "export" / fmt
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if fmt == "lora":
        tmp.mkdir(parents=True)
        shutil.copy2(lora / "pytorch_lora_weights.safetensors", tmp / "pytorch_lora_weights.safetensors")
    elif fmt == "pipeline":
        from hydra.utils import instantiate

        cfg = OmegaConf.load(run_dir / "config.yaml")
        member = "lcm" if "lcm" in cfg.sampler._target_ else "diffusion"
        pipe = instantiate(cfg.model).load(member)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(tmp)
    else:
        raise ConfigError(f"--format {fmt!r} is not one of ['lora', 'pipeline']")
    (tmp / "README.md").write_text(model_card(run_dir, fmt))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a run dir written by `python -m rlcm_exp`")
    parser.add_argument("--format", default="lora", choices=["lora", "pipeline"])
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export/FORMAT)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export(args.run_dir, args.format, args.out)}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
