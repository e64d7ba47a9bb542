"""Memory ESTIMATES for the paper-size flow configurations (docs/flow-memory.md): parameter counts of the
real architectures, built from their published config.json values on the meta device (no weights, no
download, no memory), and the activation arithmetic the table shows. Run:

    PYTHONPATH=src:. python docs/flow_memory.py

Estimates only, until `make gpu-check` measures them on a GPU. Not part of the package."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from benchmarks.bench.full_models import CLIP_G_TEXT, SD3_VAE, SD15_TEXT, SD35_TRANSFORMERS, T5_XXL

GIB = 2**30
# transformer/config.json sizes of the hub models: SD3.5's and its text encoders' are the GPU check's
# (benchmarks/bench/full_models.py), FLUX.1's here
SD35_LARGE, SD35_MEDIUM = SD35_TRANSFORMERS["sd35_large"], SD35_TRANSFORMERS["sd35_medium"]
FLUX1 = dict(
    attention_head_dim=128, num_attention_heads=24, num_layers=19, num_single_layers=38, in_channels=64,
    joint_attention_dim=4096, pooled_projection_dim=768, patch_size=1, guidance_embeds=True,
)  # fmt: skip
CLIP_L = {k: v for k, v in SD15_TEXT.items() if k != "hidden_act"}
VAE16 = {k: v for k, v in SD3_VAE.items() if k not in ("scaling_factor", "shift_factor")}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(
    module: torch.nn.Module, rank: int = 16, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
) -> int:
    """rank x (in + out) per targeted Linear: what conf/algo/_base_.yaml's LoRA adds."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in targets)
    )


# Training activations of one transformer call, bytes per sample per block, bf16, attention by SDPA
# (no stored score matrix): 34 s h (Korthikanti et al. 2022, "Reducing Activation Recomputation in
# Large Transformer Models", eq. 2 without its 5 a s^2 term); with gradient checkpointing each block
# keeps only its bf16 input, 2 s h, and one block at a time is recomputed (34 s h more).
ACT_PER_TOKEN_WIDTH = 34
CKPT_PER_TOKEN_WIDTH = 2
# (name, transformer, text encoders, width h, blocks, text tokens, CFG batch factor in training, steps)
CONFIGS = [
    ("SD3.5-Medium, Flow-GRPO (flow_sde, CFG 4.5)", "SD3.5-Medium transformer", "sd3", 1536, 24, 333, 2, 10),
    ("SD3.5-Large, Flow-GRPO (flow_sde, CFG 4.5)", "SD3.5-Large / Large-Turbo transformer", "sd3", 2432, 38, 333, 2, 10),
    ("SD3.5-Large-Turbo, RLCM (flow_consistency, no CFG)", "SD3.5-Large / Large-Turbo transformer", "sd3", 2432, 38, 333, 1, 4),
    ("FLUX.1-dev, Flow-GRPO (flow_sde, guidance embedding)", "FLUX.1-dev / schnell transformer", "flux", 3072, 57, 512, 1, 10),
    ("FLUX.1-schnell, RLCM (flow_consistency, no guidance)", "FLUX.1-dev / schnell transformer", "flux", 3072, 57, 512, 1, 4),
]  # fmt: skip
TEXT = {
    "sd3": ("CLIP-L text (with projection)", "OpenCLIP bigG text (with projection)", "T5-XXL encoder"),
    "flux": ("CLIP-L text (with projection)", "T5-XXL encoder"),
}


def table(params: dict[str, int], loras: dict[str, int], side: int = 1024, train_batch: int = 2) -> list[str]:
    """One markdown row per configuration: GiB of frozen bf16 weights, LoRA with fp32 Adam (16 bytes
    per parameter: weight, gradient, two moments), and one training call's activations with and
    without gradient checkpointing (train.train_batch_size trajectories x the CFG factor)."""
    image_tokens = (side // 8 // 2) ** 2  # VAE factor 8, 2x2 patches (SD3) or packing (FLUX)
    rows = []
    for name, transformer, text, h, blocks, text_tokens, cfg, steps in CONFIGS:
        weights = 2 * (
            params[transformer] + sum(params[t] for t in TEXT[text]) + params["VAE (16 latent channels)"]
        )
        lora = 16 * loras[transformer]
        s, batch = image_tokens + text_tokens, train_batch * cfg
        act = ACT_PER_TOKEN_WIDTH * s * h * blocks * batch
        ckpt = (CKPT_PER_TOKEN_WIDTH * blocks + ACT_PER_TOKEN_WIDTH) * s * h * batch
        rows.append(
            f"| {name} | {side} | {steps} | {s} = {image_tokens} + {text_tokens} | {batch} | "
            f"{weights / GIB:.1f} | {lora / GIB:.2f} | {act / GIB:.1f} | {ckpt / GIB:.1f} | "
            f"{(weights + lora + act) / GIB:.0f} | {(weights + lora + ckpt) / GIB:.0f} |"
        )
    return rows


def main() -> None:
    with torch.device("meta"):
        models = {
            "SD3.5-Large / Large-Turbo transformer": SD3Transformer2DModel(**SD35_LARGE),
            "SD3.5-Medium transformer": SD3Transformer2DModel(**SD35_MEDIUM),
            "FLUX.1-dev / schnell transformer": FluxTransformer2DModel(**FLUX1),
            "CLIP-L text (with projection)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "OpenCLIP bigG text (with projection)": CLIPTextModelWithProjection(
                CLIPTextConfig(**CLIP_G_TEXT)
            ),
            "T5-XXL encoder": T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL)),
            "VAE (16 latent channels)": AutoencoderKL(**VAE16),
        }
    params = {name: count(m) for name, m in models.items()}
    loras = {name: lora_params(m) for name, m in models.items()}
    for name in models:
        print(
            f"{name}: {params[name] / 1e9:.3f} B parameters; LoRA r16 on to_q/k/v/out: {loras[name] / 1e6:.1f} M"
        )
    print("\n".join(table(params, loras, 1024)))
    print("\n".join(table(params, loras, 512)))


if __name__ == "__main__":
    main()
