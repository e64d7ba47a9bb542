"""Prompt sets of the paper's tasks and of the toy world, by name.

A task names its training prompts and its held-out evaluation prompts with `prompt_set(name=...)`;
`prompt_set(file=...)` reads one prompt per line from a user file instead.
"""

from __future__ import annotations

from collections.abc import Callable
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


def toy_train() -> list[str]:
    from rlcm_exp.toy.data import train_prompts

    return train_prompts()


def toy_heldout() -> list[str]:
    from rlcm_exp.toy.data import heldout_prompts

    return heldout_prompts()


PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "imagenet_animals": imagenet_animals,
    "imagenet_animals_short": imagenet_animals_short,
    "simple_animals": simple_animals,
    "animal_activities": animal_activities,
    "unseen": unseen,
    "toy_train": toy_train,
    "toy_heldout": toy_heldout,
}


def prompt_set(name: str | None = None, file: str | None = None) -> list[str]:
    """The named prompt set, or the non-empty lines of `file`."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file {file} does not exist (task.prompts.file)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt file {file} has no prompts (task.prompts.file)")
        return prompts
    if name not in PROMPT_SETS:
        raise ConfigError(
            f"unknown prompt set {name!r} (task.prompts.name / task.eval_prompts.name); valid: "
            f"{sorted(PROMPT_SETS)}, or give task.prompts.file=path/to/prompts.txt"
        )
    return PROMPT_SETS[name]()
