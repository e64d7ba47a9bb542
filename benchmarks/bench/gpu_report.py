"""The GPU check's report: per run its phases, the per-GPU round they project to, memory and MFU;
per task and variant the RLCM:DDPO ratios. JSON (everything) and a markdown table."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.bench.report import unet_training_calls

SCHEMA = 1
# dense fp16/bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name
NOMINAL_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12}
PHASES = ("sampling", "reward_wait", "training", "optimizer", "other")


def nominal_peak(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_PEAK.items() if k in device_name), None)


def _phases(epoch: dict[str, Any]) -> dict[str, float]:
    """The measured round's phases, grouped: sampling (text encoder, UNet loop, VAE decode), the wait
    for rewards, training (log-prob forward + backward), optimizer, other (advantages, logging, loop)."""
    p = epoch["phases"]
    return {
        "sampling": p["text_encode"] + p["sampling"] + p["vae_decode"],
        "reward_wait": p["reward_wait"],
        "training": p["logprob_forward"] + p["backward"],
        "optimizer": p["optimizer"],
        "other": p["advantages"] + p["logging"] + p["other"] + p.get("checkpoint", 0.0),
    }


def _project(measured: dict[str, float], settings: dict[str, Any]) -> dict[str, float]:
    """The short round's phases scaled to one GPU's share of the paper's round (gpu_plan.round_scale)."""
    from benchmarks.bench.gpu_plan import TaskSettings, round_scale

    fields = {f.name for f in dataclasses.fields(TaskSettings)}  # a flow row's settings carry more
    factor = round_scale(TaskSettings(**{k: v for k, v in settings.items() if k in fields}))
    scale = {
        "sampling": factor["sampling"],
        "reward_wait": factor["sampling"],
        "training": factor["training"],
    }
    scale["optimizer"] = factor["optimizer"]
    out = {k: v * scale.get(k, 1.0) for k, v in measured.items()}
    out["round_s"] = sum(out.values())
    return out


def summarize_run(record: dict[str, Any], device_name: str) -> dict[str, Any]:
    """One run's record with its summary; failed and skipped runs keep their status and error."""
    out: dict[str, Any] = {k: record[k] for k in ("settings", "variant", "status") if k in record}
    if record.get("status") != "ok":
        return {**out, "error": record.get("error", "")}
    epoch = record["epochs"][-1]
    measured = _phases(epoch)
    plan, flops = record["batch_plan"], record["flops"]
    train_flops = flops["unet_train_call"] * unet_training_calls(plan)
    sample_flops = flops["unet_sample_call"] * plan["sampling_batches"] * record["settings"]["num_steps"]
    peaks = {"measured_matmul": record["matmul_peak"]["flops_per_s"], "nominal": nominal_peak(device_name)}

    def mfu(flop: float, seconds: float) -> dict[str, float | None]:
        return {k: (flop / seconds / p if p and seconds > 0 else None) for k, p in peaks.items()}

    return {
        **out,
        "run_s": record.get("run_s"),
        "batch_plan": plan,
        "unet_batches": record.get("unet_batches", {}),
        "measured": {"round_s": epoch["epoch_s"], "phases": measured},
        "per_gpu_round": _project(measured, record["settings"]),
        "rollout_s": epoch["rollout_s"],
        "peak_memory": epoch["peak_memory"],
        "monitors": epoch.get("monitors", {}),
        "flops": {**flops, "train_round": train_flops, "sampling_round": sample_flops},
        "matmul_peak": record["matmul_peak"],
        "nominal_peak_flops_per_s": peaks["nominal"],
        "mfu": {
            "training": mfu(train_flops, measured["training"]),
            "sampling": mfu(sample_flops, measured["sampling"]),
            "round": mfu(train_flops + sample_flops, epoch["epoch_s"]),
        },
    }


def _ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RLCM:DDPO rollout (per sampling batch) and per-GPU round ratios, per task and variant."""
    ok = {
        (r["settings"]["task"], r["variant"]["name"], r["settings"]["algo"]): r
        for r in runs
        if r["status"] == "ok"
    }
    out = []
    for (task, variant, algo), rlcm in ok.items():
        ddpo = ok.get((task, variant, "ddpo"))
        if algo != "rlcm" or ddpo is None:
            continue
        out.append(
            {
                "task": task,
                "variant": variant,
                "rollout_ratio_rlcm_to_ddpo": rlcm["rollout_s"] / ddpo["rollout_s"],
                "round_ratio_rlcm_to_ddpo": rlcm["per_gpu_round"]["round_s"]
                / ddpo["per_gpu_round"]["round_s"],
            }
        )
    return out


def build_gpu_report(
    header: dict[str, Any], records: list[dict[str, Any]], build_s: float, wall_s: float
) -> dict[str, Any]:
    device = header["environment"]["device"]
    name = device.get("name", "cpu")
    runs = [summarize_run(r, name) for r in records]
    return {
        "schema": SCHEMA,
        **header,
        "device_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu",
        "build_s": build_s,
        "wall_s": wall_s,
        "runs": runs,
        "ratios": _ratios(runs),
        "raw": records,
    }


# ----------------------------------------------------------------------------- markdown


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _monitor_cell(m: dict[str, Any]) -> str:
    """ratio_first_max_dev / the first loss call's clipfrac / the round's clipfrac: in exact
    arithmetic 0 / 0 / (anything); a first deviation above the clip range is precision noise."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"{fmt(m.get('ratio_first_max_dev'), '.1e')} / {fmt(m.get('clipfrac_first_call'), '.3f')} / "
        f"{fmt(m.get('clipfrac'), '.3f')}"
    )


def _run_row(r: dict[str, Any]) -> str:
    s, v = r["settings"], r["variant"]
    shape = (
        f"{s['per_gpu_samples']} / {s['sample_batch_size']} / {s['train_batch_size']} / {s['num_steps']} / "
        f"{s['resolution']}"
    )
    head = f"| {s['task']} | {s['algo'].upper()} | {shape} | {v['name']} |"
    if r["status"] != "ok":
        return head + f" {r['status']}: {r.get('error', '')} |" + " |" * 10
    g, m = r["per_gpu_round"], r["mfu"]
    cells = [
        "ok",
        _gib(r["peak_memory"]["bytes"]),
        f"{g['round_s']:.2f}",
        *(f"{g[k]:.2f}" for k in PHASES),
        f"{r['rollout_s']:.2f}",
        f"{_pct(m['training']['measured_matmul'])} / {_pct(m['round']['measured_matmul'])}",
        _monitor_cell(r.get("monitors", {})),
    ]
    return head + " " + " | ".join(cells) + " |"


def render_gpu_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    dev, v = env["device"], env["versions"]
    name = dev.get("name", f"CPU ({env['machine']['cpu']})")
    ok = [r for r in report["runs"] if r["status"] == "ok"]
    peak = ok[0]["matmul_peak"] if ok else None
    lines = [
        f"### gpu-check ({report['scale']}) on {name}",
        "",
        f"{report['created_utc']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}; "
        f"commit {v['rlcm_exp_commit'][:12]}. Members built in {report['build_s']:.0f} s; whole check "
        f"{report['wall_s']:.0f} s (budget {report['budget_s']:.0f} s).",
        "",
        "Per-GPU shape = trajectories per round / sample batch / train batch / steps / px. Seconds are one "
        "GPU's share of the paper's round, projected from a measured round of one sampling batch "
        "(sampling x batches, training x trajectories, optimizer x steps). MFU = counted UNet FLOPs over "
        "the measured dense matmul rate"
        + (f" ({peak['flops_per_s'] / 1e12:.1f} TFLOP/s {peak['dtype']})" if peak else "")
        + ", training phase / whole round. The last column is the cheapest correctness check: before any "
        "optimizer step the ratios are 1, so a ratio_first_max_dev above the clip range (1e-4) or a nonzero "
        "first-call clipfrac is precision noise (algo.recompute_old_log_probs).",
        "",
        "| task | algo | per-GPU shape | variant | status | peak GiB | round s | sampling | reward wait "
        "| training | optimizer | other | rollout s/batch | MFU train / round "
        "| ratio_first_max_dev / clipfrac first call / round |",
        "|---" * 15 + "|",
        *(_run_row(r) for r in report["runs"]),
        "",
        "| task | variant | RLCM:DDPO rollout | RLCM:DDPO round |",
        "|---|---|---|---|",
        *(
            f"| {q['task']} | {q['variant']} | 1:{1 / q['rollout_ratio_rlcm_to_ddpo']:.2f} | "
            f"1:{1 / q['round_ratio_rlcm_to_ddpo']:.2f} |"
            for q in report["ratios"]
        ),
    ]
    return "\n".join(lines) + "\n"


def write_gpu_report(report: dict[str, Any], out: Path) -> tuple[Path, str]:
    """OUT/gpu-{device}.json and .md; the stem and the table."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{report['device_slug']}"
    table = render_gpu_markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    return stem, table
