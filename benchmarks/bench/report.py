"""From raw measurements to the report: medians and spreads, the markdown table, the README block."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench.scales import ALGOS

SCHEMA = 1

PHASE_ROWS = [  # (epoch phase, the floor component it is compared with, label)
    ("text_encode", "text_encoder", "text encoder (+ tokenise)"),
    ("sampling", "unet_sample", "sampling: UNet step loop"),
    ("vae_decode", "vae_decode", "VAE decode"),
    ("reward_wait", "reward", "reward wait (scored in a thread while sampling)"),
    ("advantages", None, "advantages (gather, per-prompt stats)"),
    ("logprob_forward", "unet_train", "log-prob recomputation, forward (floor: UNet fwd+bwd)"),
    ("backward", None, "log-prob recomputation, backward"),
    ("optimizer", "optimizer", "optimizer (clip, step, LR, zero_grad)"),
    ("logging", None, "logging (metrics, image grid)"),
    ("checkpoint", None, "checkpoint (full state, amortised per epoch)"),
    ("other", None, "other loop code"),
]


def unet_training_calls(plan: dict[str, Any]) -> int:
    """BatchPlan.unet_training_calls from the plan's dict (a report may predate transitions_per_forward)."""
    per_call = plan.get("transitions_per_forward", 1) or plan["trained_transitions"]
    calls_per_minibatch = plan["trained_transitions"] // per_call
    return plan["inner_epochs"] * plan["minibatches_per_inner_epoch"] * calls_per_minibatch


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _mfu(raw: dict[str, Any], epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Model FLOP utilisation of the measured phases and of the floor, over the measured matmul peak."""
    flops, plan, floors = raw["flops"], raw["batch_plan"], raw["floors"]
    peak = raw["matmul_peak"]["flops_per_s"]
    train_calls = unet_training_calls(plan)
    sample_calls = plan["sampling_batches"] * int(raw["sampler"].get("num_steps", 0))
    train_flops = flops.get("unet_train_call", 0) * train_calls
    sample_flops = flops.get("unet_sample_call", 0) * sample_calls
    train_s = [e["phases"]["logprob_forward"] + e["phases"]["backward"] for e in epochs]
    sample_s = [e["phases"]["sampling"] for e in epochs]
    return {
        "peak_dtype": raw["matmul_peak"]["dtype"],
        "peak_flops_per_s": peak,
        "train": spread([train_flops / s / peak for s in train_s if s > 0]),
        "sampling": spread([sample_flops / s / peak for s in sample_s if s > 0]),
        "train_floor": spread([train_flops / f["unet_train"] / peak for f in floors if f["unet_train"] > 0]),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians and spreads over repeats; overhead is taken per repeat (epoch i / floor i), then summarised."""
    floors = raw["floors"]
    # the full checkpoint written every `checkpoint_every` epochs is part of what an epoch costs:
    # its time per save, amortised, is added to each epoch as one more phase
    saves = raw.get("full_checkpoints_s") or []
    every = raw.get("checkpoint_every", 0)
    amortised = statistics.median(saves) / every if saves and every > 0 else 0.0
    epochs = [
        {**e, "epoch_s": e["epoch_s"] + amortised, "phases": {**e["phases"], "checkpoint": amortised}}
        for e in raw["epochs"]
    ]
    mems = [e["peak_memory"] for e in epochs]
    phases = {k: spread([e["phases"][k] for e in epochs]) for k in epochs[0]["phases"]} if epochs else {}
    return {
        "algo": raw["algo"],
        "sampler": raw["sampler"],
        "batch_plan": raw["batch_plan"],
        "notes": raw["notes"],
        "epoch_s": spread([e["epoch_s"] for e in epochs]),
        "floor_s": spread([f["total"] for f in floors]),
        "overhead": spread([e["epoch_s"] / f["total"] for e, f in zip(epochs, floors, strict=True)]),
        "phases": phases,
        "floor": {k: spread([f[k] for f in floors]) for k in floors[0]} if floors else {},
        "reward_s": spread([e["reward_s"] for e in epochs]),
        "rollout_s": spread([e["rollout_s"] for e in epochs]),
        "images_per_s": spread([e["images_per_s"] for e in epochs]),
        "peak_memory": {
            "kind": mems[0]["kind"] if mems else "none",
            "bytes": max((m["bytes"] for m in mems), default=0),
        },
        "checkpoint_s": raw["checkpoint_s"],
        "cuda_syncs_warmup_epoch": raw.get("cuda_syncs_warmup_epoch"),
        "checkpoint_full_s": spread(saves),
        "checkpoint_every": every,
        "flops": raw["flops"],
        "mfu": _mfu(raw, epochs),
        "unet_batches": raw.get("unet_batches", {}),
        "transitions_compare": [
            {**row, "seconds": spread(row["seconds"])} for row in raw.get("transitions_compare", [])
        ],
        "raw": {
            "epochs": epochs,
            "floors": floors,
            "overrides": raw["overrides"],
            "warmup_epochs": raw["warmup_epochs"],
            "torch_threads": raw["torch_threads"],
        },
    }


def build_report(header: dict[str, Any], raws: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole report: `header` (scale, repeats, time, command, environment) + per-algorithm summaries
    + the RLCM:DDPO comparison when both ran."""
    report: dict[str, Any] = {"schema": SCHEMA, **header, "algos": {a: summarize(r) for a, r in raws.items()}}
    if "rlcm" in report["algos"] and "ddpo" in report["algos"]:
        r, d = report["algos"]["rlcm"], report["algos"]["ddpo"]
        report["comparison"] = {
            "rollout_ratio_rlcm_to_ddpo": r["rollout_s"]["median"] / d["rollout_s"]["median"],
            "epoch_ratio_rlcm_to_ddpo": r["epoch_s"]["median"] / d["epoch_s"]["median"],
        }
    return report


# ----------------------------------------------------------------------------- markdown


def _fmt(s: dict[str, float], unit: str = "", digits: int = 3) -> str:
    if not s or s.get("n", 0) == 0 or s["median"] != s["median"]:
        return "-"
    med = f"{s['median']:.{digits}f}{unit}"
    return med if s["n"] < 2 else f"{med} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _intro(report: dict[str, Any], names: list[str]) -> list[str]:
    """Title, software, the shared batch settings and each algorithm's sampler, notes and warnings."""
    env, algos = report["environment"], report["algos"]
    dev, machine, v = env["device"], env["machine"], env["versions"]
    device = (
        dev.get("name", "CPU")
        if dev["type"] == "cuda"
        else f"CPU ({machine['cpu']}, {machine['cpu_count']} cores)"
    )
    first = algos[names[0]]
    plan = first["batch_plan"]
    lines = [
        f"### `--scale {report['scale']}` on {device}",
        "",
        f"{report['created_utc']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}, peft {v['peft']}, Python {v['python']}; torch threads "
        f"{first['raw']['torch_threads']}; load average at start {machine['load_average_at_start'][0]:.2f}; "
        f"commit {v['rlcm_exp_commit'][:12]}.",
        "",
        f"Same settings for both: {plan['samples_per_epoch']} trajectories/epoch in {plan['sampling_batches']} "
        f"sampling batch(es) of {plan['sample_batch_size']}, training minibatches of {plan['train_batch_size']}, "
        f"{plan['optimizer_steps_per_epoch']} optimizer step(s)/epoch. "
        + "; ".join(
            f"{a.upper()}: {algos[a]['sampler'].get('num_steps')} steps"
            + (f", CFG {algos[a]['sampler'].get('guidance_scale')}" if a == "ddpo" else "")
            + f", {algos[a]['batch_plan']['trained_transitions']} trained transitions/trajectory"
            for a in names
        )
        + f". {report['repeats']} measured epoch(s) after {first['raw']['warmup_epochs']} warm-up; "
        "median [min-max] seconds per epoch.",
        "",
    ]
    lines += [f"- {a.upper()} note: {n}" for a in names for n in algos[a]["notes"]]
    load = machine["load_average_at_start"][0]
    if dev["type"] == "cpu" and load > 0.5:
        lines.append(
            f"- **warning**: load average {load:.2f} at start; other processes shared the CPU, "
            "so the times are inflated and noisy."
        )
    return lines


def _phase_lines(algos: dict[str, Any], names: list[str]) -> list[str]:
    """The table's header and one row per epoch phase, each next to its floor component."""
    header = "| phase | " + " | ".join(f"{a.upper()} | {a.upper()} floor" for a in names) + " |"
    lines = ["", header, "|---" * (1 + 2 * len(names)) + "|"]
    for phase, floor_key, label in PHASE_ROWS:
        cells = []
        for a in names:
            cells.append(_fmt(algos[a]["phases"].get(phase, {})))
            cells.append(_fmt(algos[a]["floor"].get(floor_key, {})) if floor_key else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


Cell = Callable[[dict[str, Any]], str]


def _total_rows(first: dict[str, Any], cuda: bool) -> list[tuple[str, Cell, Cell]]:
    """(label, the algorithm's cell, its floor cell) of the rows under the phases."""

    def none(s: dict[str, Any]) -> str:
        return ""

    rows: list[tuple[str, Cell, Cell]] = [
        ("**epoch**", lambda s: _fmt(s["epoch_s"]), lambda s: _fmt(s["floor_s"])),
        ("**overhead = epoch / floor**", lambda s: _fmt(s["overhead"], digits=3), none),
        ("reward scoring, total (overlapped)", lambda s: _fmt(s["reward_s"]), none),
        ("rollout s per sampling batch", lambda s: _fmt(s["rollout_s"]), none),
        ("sampling images/s", lambda s: _fmt(s["images_per_s"], digits=2), none),
        (
            "peak memory (" + first["peak_memory"]["kind"] + ")",
            lambda s: f"{s['peak_memory']['bytes'] / 2**20:.0f} MiB",
            none,
        ),
        (
            "checkpoint, full state, s per save (every N epochs)",
            lambda s: _fmt(s["checkpoint_full_s"]) + f" (N={s['checkpoint_every']})",
            none,
        ),
        (
            "final LoRA save, once per run",
            lambda s: f"{s['checkpoint_s']:.3f}" if s["checkpoint_s"] is not None else "-",
            none,
        ),
        (
            "MFU, training fwd+bwd (peak " + first["mfu"]["peak_dtype"] + " matmul)",
            lambda s: _fmt(s["mfu"]["train"], digits=4),
            lambda s: _fmt(s["mfu"]["train_floor"], digits=4),
        ),
    ]
    if cuda:
        rows.append(
            ("host-device syncs in the warm-up epoch", lambda s: str(s["cuda_syncs_warmup_epoch"]), none)
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """The table of benchmarks/README.md for one report."""
    algos = report["algos"]
    names = [a for a in ALGOS if a in algos]
    first = algos[names[0]]
    lines = _intro(report, names) + _phase_lines(algos, names)
    for label, main, fl in _total_rows(first, report["environment"]["device"]["type"] == "cuda"):
        lines.append(f"| {label} | " + " | ".join(f"{main(algos[a])} | {fl(algos[a])}" for a in names) + " |")
    lines += _cfg_lines(algos, names) + _compare_lines(algos, names)
    comp = report.get("comparison", {})
    if comp:
        lines += [
            "",
            f"RLCM:DDPO rollout time per sampling batch = 1:{1 / comp['rollout_ratio_rlcm_to_ddpo']:.2f} "
            f"({comp['rollout_ratio_rlcm_to_ddpo']:.3f}); epoch time 1:{1 / comp['epoch_ratio_rlcm_to_ddpo']:.2f}. "
            f"Measured matmul peak: {first['mfu']['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({first['mfu']['peak_dtype']}).",
        ]
    return "\n".join(lines) + "\n"


def _cfg_lines(algos: dict[str, Any], names: list[str]) -> list[str]:
    """The classifier-free-guidance path stated with the UNet batches the epoch really ran."""
    lines = [""]
    for a in names:
        s, b = algos[a]["sampler"], algos[a].get("unet_batches") or {}
        if not b:
            continue
        plan = algos[a]["batch_plan"]
        scale = s.get("guidance_scale")
        doubled = b["sample"] == 2 * plan["sample_batch_size"]
        if doubled:
            how = f"classifier-free guidance {scale}: conditional and empty-prompt halves in ONE doubled UNet call"
        elif a == "rlcm":
            how = f"guidance {scale} as the LCM UNet's guidance-embedding input, no doubling"
        else:
            how = f"no classifier-free guidance (scale {scale}): one conditional UNet call"
        lines.append(
            f"- {a.upper()} CFG path: {how}; UNet batch {b['sample']} per sampling call "
            f"(sample batch {plan['sample_batch_size']}), {b['train']} per training call in the recomputation "
            f"(train batch {plan['train_batch_size']} x {plan.get('transitions_per_forward', 1)} transition(s) per "
            f"call{' x 2' if b['train_per_transition'] == 2 * plan['train_batch_size'] else ''})."
        )
    return lines


def _compare_lines(algos: dict[str, Any], names: list[str]) -> list[str]:
    """The training phase (the production `update`) replayed with one vs all transitions per UNet call."""
    have = [a for a in names if algos[a].get("transitions_compare")]
    if not have:
        return []
    cols = [(a, row) for a in have for row in algos[a]["transitions_compare"]]
    mem_kind = cols[0][1]["peak_memory"]["kind"]

    def label(row: dict[str, Any]) -> str:
        return "all" if row["transitions_per_forward"] == 0 else str(row["transitions_per_forward"])

    lines = [
        "",
        "Training phase (`Trainer.update` on the last round, replayed; median [min-max] s) with "
        "`train.transitions_per_forward` = 1 vs all:",
        "",
        "| | " + " | ".join(f"{a.upper()} {label(r)}/call" for a, r in cols) + " |",
        "|---" * (1 + len(cols)) + "|",
        "| UNet training calls x batch | "
        + " | ".join(f"{r['unet_training_calls']} x {_call_batch(algos[a], r)}" for a, r in cols)
        + " |",
        "| seconds | " + " | ".join(_fmt(r["seconds"]) for _, r in cols) + " |",
        "| speed-up vs 1/call | " + " | ".join(_speedup(algos[a], r) for a, r in cols) + " |",
        f"| peak memory ({mem_kind}) | "
        + " | ".join(f"{r['peak_memory']['bytes'] / 2**20:.0f} MiB" for _, r in cols)
        + " |",
        "| peak - memory before | "
        + " | ".join(
            f"{(r['peak_memory']['bytes'] - r['memory_before_bytes']) / 2**20:.0f} MiB" for _, r in cols
        )
        + " |",
    ]
    return lines


def _call_batch(algo: dict[str, Any], row: dict[str, Any]) -> str:
    per_transition = (algo.get("unet_batches") or {}).get("train_per_transition")
    return str(per_transition * row["per_call"]) if per_transition else "?"


def _speedup(algo: dict[str, Any], row: dict[str, Any]) -> str:
    one = next((r for r in algo["transitions_compare"] if r["per_call"] == 1), None)
    if one is None or not row["seconds"]["n"] or row["seconds"]["median"] <= 0:
        return "-"
    return f"{one['seconds']['median'] / row['seconds']['median']:.2f}x"


def update_readme(readme: Path, scale: str, table: str) -> None:
    """Replace the block between the scale's markers in the README (appended when absent)."""
    start, end = f"<!-- bench:{scale}:start -->", f"<!-- bench:{scale}:end -->"
    text = readme.read_text() if readme.is_file() else ""
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def write_report(report: dict[str, Any], out: Path, readme: Path | None) -> tuple[Path, str]:
    """Write OUT/{scale}-{device}.json and .md (and the README block); return the stem and the table."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['scale']}-{report['environment']['device']['type']}"
    table = render_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    if readme is not None:
        update_readme(readme, stem, table)
    return out / stem, table
