"""Prompt sets of the paper's tasks, and those shipped as data files (assets/prompts/), by name.

A task names its training prompts and its held-out evaluation prompts with `prompt_set(name=...)`;
a user's own come from a file, one prompt per line (`task.prompts.file=my_prompts.txt`), or from a
list on the command line (`task.prompts.prompts='[a cat,a red fox]'`); `task.eval_prompts` likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rlcm_exp.errors import ConfigError

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck "
    "goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]
UNSEEN = ["bike", "fridge", "waterfall", "tractor"]  # the paper's generalisation prompts


IMAGENET_ANIMALS_FILE = Path(__file__).parent / "assets" / "imagenet_animals.txt"
# prompt sets shipped as data files, one prompt per line, each listed with its source and licence in
# the folder's README.md: usable by file name (without .txt) wherever a set is named
PROMPT_FILES_DIR = Path(__file__).parent / "assets" / "prompts"
# standard benchmark sets this project does not ship (assets/prompts/README.md says why): where to get them
NOT_SHIPPED = {
    "drawbench": "DrawBench (Imagen, arXiv 2205.11487): a Google Sheet linked from the Imagen project page, "
    "mirrored as the hub dataset shunk031/DrawBench; no licence stated",
    "geneval": "GenEval (arXiv 2310.11513): prompts/evaluation_metadata.jsonl (field prompt) of the GitHub "
    "repository djghosh13/geneval",
    "partiprompts": "PartiPrompts (Parti, arXiv 2206.10789): PartiPrompts.tsv (column Prompt) of the GitHub "
    "repository google-research/parti, mirrored as the hub dataset nateraw/parti-prompts (Apache-2.0)",
}


def imagenet_animals() -> list[str]:
    """ImageNet-1k classes 0..397 (the animals) with their full WordNet synonym strings ("tench, Tinca
    tinca"), as the reference code (ddpo-pytorch's imagenet_classes.txt) prompts them."""
    return IMAGENET_ANIMALS_FILE.read_text().splitlines()


def imagenet_animals_short() -> list[str]:
    """The same classes by their first synonym only ("tench"), as torchvision names them."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"][:398])


def simple_animals() -> list[str]:
    return list(SIMPLE_ANIMALS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def animal_activities() -> list[str]:
    """ "a/an {animal} {activity}" for the prompt-image alignment task (135 prompts)."""
    return [f"{_article(a)} {a} {act}" for a in SIMPLE_ANIMALS for act in ACTIVITIES]


def unseen() -> list[str]:
    return list(UNSEEN)


def read_prompt_file(path: Path, what: str) -> list[str]:
    """The non-empty lines of a prompt file, stripped; `what` names the setting in the errors."""
    if not path.is_file():
        raise ConfigError(f"prompt file {path} ({what}) does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # name the file and where, never its bytes
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"prompt file {path} ({what}) is not UTF-8 text (byte {err.start}, line {line}); save it as "
            "UTF-8, one prompt per line."
        ) from None
    except OSError as err:
        raise ConfigError(f"prompt file {path} ({what}) cannot be read ({err.strerror or err})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompt file {path} ({what}) has no prompts")
    return lines


def shipped_prompt_files() -> dict[str, Path]:
    """The prompt sets shipped as data files (assets/prompts/NAME.txt), by NAME."""
    return {p.stem: p for p in sorted(PROMPT_FILES_DIR.glob("*.txt"))}


def _shipped(path: Path) -> Callable[[], list[str]]:
    return lambda: read_prompt_file(path, f"the shipped prompt set {path.stem}")


PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "imagenet_animals": imagenet_animals,
    "imagenet_animals_short": imagenet_animals_short,
    "simple_animals": simple_animals,
    "animal_activities": animal_activities,
    "unseen": unseen,
    **{name: _shipped(path) for name, path in shipped_prompt_files().items()},
}


def unknown_set_hint(name: str | None) -> str:
    """Where a standard set this project does not ship comes from, for an unknown set's error."""
    key = str(name).lower().replace("-", "").replace("_", "")
    source = NOT_SHIPPED.get(key)
    if source is None:
        return ""
    return (
        f" {name} is not shipped (src/rlcm_exp/assets/prompts/README.md says why): get it from {source}, "
        "check its licence, and give it as a text file, one prompt per line."
    )


def prompt_set(
    name: str | None = None,
    file: str | None = None,
    prompts: Sequence[str] | None = None,
    sets: Mapping[str, Callable[[], list[str]]] | None = None,
) -> list[str]:
    """The prompts of a task node: the list `prompts` if given, else the non-empty lines of `file`,
    else the set `name` of `sets` (default: the built-in PROMPT_SETS; a plug-in such as the toy world
    passes its own). task.prompts and task.eval_prompts are both such nodes."""
    sets = PROMPT_SETS if sets is None else sets
    if prompts is not None:
        if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(
                f"prompts={prompts!r} (task.prompts / task.eval_prompts): give a list of non-empty "
                "strings, e.g. task.prompts.prompts='[a cat,a red fox]'"
            )
        if not prompts:
            raise ConfigError(
                "prompts=[] (task.prompts / task.eval_prompts) is empty: give a prompt, or null"
            )
        return [str(p).strip() for p in prompts]
    if file is not None:
        return read_prompt_file(Path(file).expanduser(), "task.prompts.file / task.eval_prompts.file")
    if name is None or name not in sets:
        raise ConfigError(
            f"unknown prompt set {name!r} (task.prompts.name / task.eval_prompts.name); valid: "
            f"{sorted(sets)}; or your own: task.prompts.file=path/to/prompts.txt (one per line) "
            "or task.prompts.prompts='[a cat,a red fox]'." + unknown_set_hint(name)
        )
    return sets[name]()
