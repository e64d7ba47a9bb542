"""Where the Hydra configs live and how library code composes them.

conf/ sits at the top of the repository (the product's layout) and ships inside the wheel as the
package `rlcm_exp.conf` (setup.py maps the folder), so every command finds it through the import
system, in an editable or a non-editable install, from any working directory.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

# `_target_`s that moved, old -> new: a run dir saved before the move (its config.yaml) still
# samples, evaluates, exports and resumes (load_saved_config rewrites them on reading)
MOVED_TARGETS = {
    "rlcm_exp.models.family.toy_family": "rlcm_exp.toy.family.toy_family",
    "rlcm_exp.rewards.toy_detector.toy_detector": "rlcm_exp.toy.reward.toy_detector",
}

CONFIG_MODULE = "rlcm_exp.conf"
HYDRA_CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # the entry points' Hydra config_path


def conf_dir() -> Path:
    """The folder holding config.yaml and the config groups (a real folder: the wheel is unzipped)."""
    return Path(str(importlib.resources.files(CONFIG_MODULE)))


def compose(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config outside an entry point (tests, reproduce, benchmarks); `${now:...}` and
    `hydra.*` interpolations stay unresolved, as in Hydra's own compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


OUTPUT_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def check_output_dirs(overrides: Sequence[str], keys: Sequence[str] = OUTPUT_DIR_KEYS) -> None:
    """Refuse a run or sweep folder (or another output folder named by `keys`) that cannot be created
    or written, before Hydra tries (its failure is a traceback)."""
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key not in keys or not value or "${" in value:
            continue
        probe_folder(Path(value), f"{key}={value}")


def probe_folder(folder: Path, what: str) -> None:
    """A ConfigError naming `what` when `folder` cannot be created or written into (a file in the way,
    a read-only file system or folder, a name too long), found by creating the missing folders and a
    probe file and removing them again (only those), so the file system is left as it was."""
    import os
    import tempfile

    from rlcm_exp.errors import ConfigError

    folder = Path(folder).expanduser().absolute()
    try:
        if os.path.lexists(folder) and not folder.is_dir():
            raise ConfigError(f"{what}: {folder} is a file, not a folder; choose another folder.")
        missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".rlcm-write-probe-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        finally:
            for created in missing:  # deepest first
                if created.is_dir():
                    created.rmdir()
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        reason = err.strerror or str(err)
        raise ConfigError(
            f"{what}: the folder cannot be created or written ({reason}{where}); choose a writable folder."
        ) from None


def is_building_block(path: Path) -> bool:
    """A config that other configs of its group include (conf/algo/_base_.yaml, _ppo_, ...), named
    `_NAME_`: not an option a user picks."""
    return path.stem.startswith("_") and path.stem.endswith("_")


def group_option_list(group: str) -> list[str]:
    """The options of a config group (subfolders as `toy/rlcm_compression`), building blocks left out."""
    root = conf_dir() / group
    return sorted(
        str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not is_building_block(p)
    )


def group_options(group: str) -> str:
    """The options of a config group, comma-separated: what the help templates in conf/hydra/help/
    list, read from the folder so that they never drift from it."""
    return ", ".join(group_option_list(group))


def automatic_layers(config_name: str = "config") -> list[tuple[str, str, list[str]]]:
    """The layers a command applies without a GROUP= on its command line: the entries of the
    config's defaults list whose option is an interpolation (`optional paper: ${algo}_${task}`), as
    (group, the option's pattern, the options shipped), read from the config so that they never drift."""
    from omegaconf import OmegaConf

    layers = []
    config = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{config_name}.yaml"), resolve=False)
    assert isinstance(config, dict), f"conf/{config_name}.yaml is not a mapping"
    for entry in config.get("defaults", []):
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        ((key, value),) = entry.items()
        group = str(key).removeprefix("optional ").strip()
        if isinstance(value, str) and "${" in value:
            files = (conf_dir() / group).glob("*.yaml")  # the layer's own files, not what they include
            layers.append((group, value, sorted(p.stem for p in files if not is_building_block(p))))
    return layers


def describe_automatic_layers(config_name: str = "config") -> str:
    """The help text's lines for automatic_layers: `GROUP/PATTERN  (options: ...)`, one per layer."""
    lines = []
    for group, pattern, shipped in automatic_layers(config_name):
        name = pattern.replace("${", "").replace("}", "").upper()
        lines.append(f"conf/{group}/{name}.yaml  if it exists (leave it out: ~{group})")
        lines.append(f"    shipped: {', '.join(shipped)}")
    return "\n".join(lines)


def register_help_resolver() -> None:
    """`${rlcm_options:GROUP}` and `${rlcm_automatic_layers:}` in the help templates (each command
    registers them before Hydra runs)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rlcm_options"):
        OmegaConf.register_new_resolver("rlcm_options", group_options)
    if not OmegaConf.has_resolver("rlcm_automatic_layers"):
        OmegaConf.register_new_resolver("rlcm_automatic_layers", lambda: describe_automatic_layers())


def load_saved_config(path: Path) -> DictConfig | None:
    """A config a run saved (RUN_DIR/config.yaml), its moved `_target_`s renamed (MOVED_TARGETS);
    None when the file does not hold a mapping."""
    from omegaconf import OmegaConf

    from rlcm_exp.errors import ConfigError

    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml's and OmegaConf's errors, undecodable bytes, a folder in its place
        raise ConfigError(
            f"{path}: cannot be read as a config ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    if not isinstance(cfg, DictConfig):
        return None
    _rename_targets(cfg)
    return cfg


def _rename_targets(node: DictConfig) -> None:
    for key in list(node.keys()):
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            _rename_targets(value)
        elif key == "_target_" and node[key] in MOVED_TARGETS:
            node[key] = MOVED_TARGETS[node[key]]
    # the toy world's prompt sets moved with it: rlcm_exp.prompts.prompt_set(name=toy_*) -> the toy's
    if node.get("_target_") == "rlcm_exp.prompts.prompt_set" and str(node.get("name")).startswith("toy_"):
        node["_target_"] = "rlcm_exp.toy.prompts.prompt_set"
