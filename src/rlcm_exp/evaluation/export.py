"""What a run learned, written as something diffusers loads without this package: a LoRA folder
(`pipe.load_lora_weights(DIR)`) or a standalone pipeline with the LoRA fused in
(`DiffusionPipeline.from_pretrained(DIR)`), each with a model card (base model, task, reward, steps,
final metrics). `python -m rlcm_exp.export` is its command line."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from hydra.utils import instantiate

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.runs import LORA_WEIGHTS, load_run_config
from rlcm_exp.models.hub import transformer_pipeline
from rlcm_exp.models.lora import check_lora_file, resolve_lora_folder, write_pipeline_lora
from rlcm_exp.policies.members import sampler_member
from rlcm_exp.tracking import read_metrics

FORMATS = ("lora", "pipeline")
# What an export wrote, relative path -> sha256 (a list of them while an overwrite is moving files in),
# kept inside the export: --overwrite replaces these files and nothing else (a user's notes or images
# beside them are never deleted), and only while they still hold what the export wrote.
MANIFEST = ".rlcm_export.json"
# the folder an export is built in, beside --out: .NAME.PID.HEX<suffix>; a killed export's is removed
# by the next export into the same --out
STAGING_SUFFIX = ".export-tmp"


def model_card(run_dir: Path, kind: str) -> str:
    """README.md of an export, a Hugging Face model card (`huggingface_hub.ModelCard`): metadata
    (base_model, tags, library) and what was trained from what, how, with what result and command."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = load_run_config(run_dir)
    member = sampler_member(cfg.sampler)
    source = cfg.model.get(member) or {}
    base = source.get("local_path") or source.get("hub_id") or cfg.model.get("name", "?")
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    last = records[-1] if records else {}
    first = records[0] if records else {}
    commit_file = run_dir / "git_commit.txt"
    commit = commit_file.read_text().strip() if commit_file.is_file() else "?"
    tags = ["rlcm-exp", cfg.algo.name, f"task-{cfg.task.name}", "lora" if kind == "lora" else "merged-lora"]
    data = ModelCardData(
        base_model=str(source.get("hub_id") or base),  # a hub id where the run had one: the Hub links it
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=[*tags, "reinforcement-learning", "text-to-image", "diffusers"],
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {cfg.algo.name.upper()} fine-tune ({kind})",
        "",
        f"- base model: `{base}` (family `{cfg.model.get('name', '?')}`, member `{member}`)",
        *lcm_lora_lines(source, kind),
        f"- algorithm: {cfg.algo.name}; sampler `{cfg.sampler.get('kind') or cfg.sampler._target_.rsplit('.', 1)[-1]}`, "
        f"steps {cfg.sampler.num_steps}, guidance {cfg.sampler.guidance_scale}",
        f"- task: {cfg.task.name}; reward `{cfg.reward._target_}`",
        f"- LoRA: rank {cfg.algo.lora.rank}, alpha {cfg.algo.lora.alpha}, modules {list(cfg.algo.lora.target_modules)}",
        f"- trained epochs: {len(records)}; reward {first.get('reward_mean', float('nan')):.4f} -> "
        f"{last.get('reward_mean', float('nan')):.4f}; GPU-hours {last.get('gpu_hours', 0.0):.4f}; "
        f"reward queries {last.get('reward_queries', 0)}",
        f"- seed {cfg.seed}; code `{commit}`",
        "",
        "Trained with rlcm-exp:",
        "",
        "```bash",
        training_command(run_dir),
        "```",
        "",
        "Load with diffusers:",
        "",
        "```python",
        "pipe.load_lora_weights(DIR)  # LoRA export"
        if kind == "lora"
        else "pipe = DiffusionPipeline.from_pretrained(DIR)",
        "```",
        "",
    ]
    return str(ModelCard("\n".join(lines)))


def training_command(run_dir: Path) -> str:
    """`python -m rlcm_exp` with the run's overrides (RUN/.hydra/overrides.yaml, which the command line's
    Hydra and `rlcm_exp.run` write); without them, the resolved config.yaml stands for the command."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return f"# overrides not recorded; the resolved config is {run_dir.name}/config.yaml"
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]  # type: ignore[union-attr]
    return " ".join(["python -m rlcm_exp", *(shlex.quote(o) for o in overrides)])


def lcm_lora_lines(source: Mapping, kind: str) -> list[str]:
    """The model card's LCM-LoRA line: which adapter the member's UNet had fused (none: no line). The
    LoRA export needs it under the RL LoRA; the pipeline export has it fused already."""
    adapter = source.get("lcm_lora") or {}
    if not adapter:
        return []
    where = adapter.get("local_path") or f"{adapter.get('hub_id')}@{adapter.get('revision', 'main')}"
    use = (
        "needed under this LoRA: `pipe.load_lora_weights(LCM_LORA, adapter_name='lcm')`, this LoRA "
        "with `adapter_name='rl'`, `pipe.set_adapters(['lcm', 'rl'])`, and "
        "`pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)`"
        if kind == "lora"
        else "already fused into this pipeline's UNet"
    )
    return [f"- LCM-LoRA: `{where}` (file `{adapter.get('weight_name')}`): {use}"]


def files_under(folder: Path) -> list[str]:
    """Every regular file below `folder` (relative POSIX paths, sorted), the manifest excepted."""
    found = (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(rel for rel in (p.relative_to(folder).as_posix() for p in found) if rel != MANIFEST)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, files: Mapping[str, str | list[str]]) -> None:
    """MANIFEST in `folder`, written whole or not at all (a torn manifest would list too little)."""
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"written_by": "rlcm_exp.export", "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def read_manifest(target: Path) -> dict[str, list[str]]:
    """The files an earlier export into `target` listed ({} when there was none); a manifest that is
    unreadable or names a path outside `target` is refused: nothing could be replaced safely."""
    path = target / MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--out {target}: {MANIFEST} there (the list of files an earlier export wrote) cannot be read "
            f"({err}), so the export cannot tell its own files from yours. Move what you want to keep "
            "elsewhere and delete the folder, or choose another --out."
        ) from err
    for rel in files:
        parts = PurePosixPath(str(rel)).parts
        if not parts or PurePosixPath(str(rel)).is_absolute() or ".." in parts or str(rel) == MANIFEST:
            raise ConfigError(
                f"--out {target}: {MANIFEST} lists {rel!r}, which is not a file inside the folder; it was not "
                "written by rlcm_exp.export. Remove it (and the files you do not need), or choose another --out."
            )
    return {str(k): [str(d) for d in v] if isinstance(v, list) else [str(v)] for k, v in files.items()}


def _describe(target: Path, given: bool) -> str:
    return f"--out {target}" if given else f"--out (default {target})"


def check_target(target: Path, overwrite: bool, given: bool = True) -> None:
    """Refuse an output folder whose contents the export could destroy, before any work is done:
    a file, or a non-empty folder without --overwrite."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{_describe(target, given)} is a file, not a folder: choose another --out.")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"{_describe(target, given)} is not empty ({len(entries)} entries: {shown}); the export does not "
            f"write into a folder that holds other files. Pass --overwrite to replace an earlier export "
            f"there (only the files it listed in {MANIFEST} are replaced; anything else is kept), or "
            "choose another --out."
        )
    read_manifest(target)  # an unreadable manifest is refused now, not after the export is built


def _blocked(target: Path, rel: str, listed: dict[str, list[str]]) -> bool:
    """Whether writing `rel` into `target` would replace something the earlier export did not write
    (or write through a link to outside `target`)."""
    if _through_link(target, rel):
        return True
    parts = PurePosixPath(rel).parts
    folders = (target.joinpath(*parts[:depth]) for depth in range(1, len(parts)))
    if any(os.path.lexists(folder) and not folder.is_dir() for folder in folders):
        return True
    path = target / rel
    return os.path.lexists(path) and (rel not in listed or not path.is_file())


def _through_link(target: Path, rel: str) -> bool:
    """Whether `target/rel` is reached through a symbolic link (a folder of the path, or the file
    itself): deleting or replacing it could touch a file outside `target`."""
    parts = PurePosixPath(rel).parts
    return any(target.joinpath(*parts[:depth]).is_symlink() for depth in range(1, len(parts) + 1))


def _changed(target: Path, listed: dict[str, list[str]]) -> list[str]:
    """Listed files that are no longer what the export wrote (edited by the user, now a link, or now
    behind a linked folder)."""
    return [
        rel
        for rel, digests in listed.items()
        if _through_link(target, rel)
        or (
            os.path.lexists(target / rel)
            and (not (target / rel).is_file() or _digest(target / rel) not in digests)
        )
    ]


def _remove_listed(target: Path, rel: str) -> None:
    """Delete one file an earlier export wrote, and the folders that only it had filled; never
    through a link (checked again here, just before the deletion)."""
    if _through_link(target, rel):
        raise ConfigError(f"--out {target}: {rel} is reached through a link; nothing there is deleted.")
    path = target / rel
    path.unlink(missing_ok=True)
    folder = path.parent
    while folder != target and not folder.is_symlink() and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def install(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the complete export in `staging` (with its manifest) to `target`: a rename when `target`
    is absent or empty; otherwise file by file, replacing only what the earlier export listed."""
    check_target(target, overwrite)  # again: the folder may have filled while the export was built
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        staging.rename(target)
        return
    listed = read_manifest(target)
    new: dict[str, str] = json.loads((staging / MANIFEST).read_text())["files"]
    blocked = [rel for rel in new if _blocked(target, rel, listed)]
    changed = _changed(target, listed)
    if blocked or changed:
        problems = [f"{rel} (not written by an export)" for rel in blocked]
        problems += [
            f"{rel} ("
            + ("behind a link" if _through_link(target, rel) else "changed since the export wrote it")
            + ")"
            for rel in changed
        ]
        raise ConfigError(
            f"--out {target}: --overwrite replaces only files an earlier export wrote and listed in "
            f"{MANIFEST}, unchanged, but the export would replace {', '.join(problems)}. Nothing was "
            "replaced: move those files away, or choose another --out."
        )
    # list the old and the new files (either content of a path) before any moves: a kill midway
    # leaves nothing of ours unlisted, and a later --overwrite can finish the job
    write_manifest(
        target,
        {
            rel: listed.get(rel, []) + ([new[rel]] if rel in new else [])
            for rel in sorted(set(listed) | set(new))
        },
    )
    for rel in sorted(set(listed) - set(new)):
        _remove_listed(target, rel)
    for rel in new:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target / rel)
    write_manifest(target, new)


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders a killed export into `target` left beside it
    (`.NAME.PID.HEX.export-tmp`, PID no longer running); a live export's, and anything that is not a
    plain folder of that name, is kept. Returns what was removed."""
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*{STAGING_SUFFIX}"):
        pid = path.name[len(target.name) + 2 : -len(STAGING_SUFFIX)].split(".")[0]
        if path.is_symlink() or not path.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows a link inside the folder
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def export(
    run_dir: str | Path,
    fmt: str = "lora",
    out: str | Path | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Path:
    """Write the run's final LoRA as `fmt` (lora | pipeline) to `out` (default RUN_DIR/export/FORMAT).

    A non-empty `out` is refused unless `overwrite`; even then only the files an earlier export
    listed in its manifest (MANIFEST) are replaced, and nothing else there is touched. The export is
    written completely into a fresh hidden folder beside `out` first, so a failed or killed export
    never replaces a complete one."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    cfg = load_run_config(run_dir)
    lora = resolve_lora_folder(run_dir, ema)  # ema: the EMA weights, checkpoints/final_ema
    check_lora_file(lora / LORA_WEIGHTS)  # a truncated or damaged LoRA is refused before anything is written
    target = Path(out) if out else run_dir / "export" / fmt
    try:
        check_target(target, overwrite, given=out is not None)  # before anything is loaded or written
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only folder, a file in the way, a name too long
        reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        raise ConfigError(
            f"{_describe(target, out is not None)}: cannot create its folder ({reason})"
        ) from None
    remove_stale_staging(target)
    # a fresh folder of this call (mkdir fails on an existing one), never DIR.tmp: a user's is not touched
    staging = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{STAGING_SUFFIX}"
    try:
        staging.mkdir()
    except OSError as err:  # a read-only folder, a path too long
        raise ConfigError(
            f"{_describe(target, out is not None)}: cannot write beside it ({err.strerror})"
        ) from None
    try:
        family, member = instantiate(cfg.model), sampler_member(cfg.sampler)
        # the LoRA as the member's stock pipeline loads it (a transformer's under its own prefix)
        stock = staging if fmt == "lora" else staging / ".lora"
        stock.mkdir(exist_ok=True)
        write_pipeline_lora(lora / LORA_WEIGHTS, stock, transformer_pipeline(member, family.member(member)))
        if fmt == "pipeline":  # a standalone pipeline of the member the sampler drives, LoRA fused in
            pipe = family.load(member)
            pipe.load_lora_weights(str(stock))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            shutil.rmtree(stock)
            pipe.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(run_dir, fmt))
        write_manifest(staging, {rel: _digest(staging / rel) for rel in files_under(staging)})
        install(staging, target, overwrite)
    finally:
        if staging.exists():  # created by this call: whatever is left of it is ours
            shutil.rmtree(staging)
    return target
