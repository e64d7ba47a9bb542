"""The toy world's prompt sets (task=toy_*): captions of the shapes data, the training set and a
held-out set of unseen combinations, by name, with the library's file and list overrides."""

from __future__ import annotations

from collections.abc import Sequence

from rlcm_exp.prompts import prompt_set as library_prompt_set
from rlcm_exp.toy.data import heldout_prompts, train_prompts

TOY_PROMPT_SETS = {"toy_train": train_prompts, "toy_heldout": heldout_prompts}


def prompt_set(
    name: str | None = None, file: str | None = None, prompts: Sequence[str] | None = None
) -> list[str]:
    """rlcm_exp.prompts.prompt_set over the toy world's sets (task.prompts.name=toy_train | toy_heldout)."""
    return library_prompt_set(name, file, prompts, sets=TOY_PROMPT_SETS)
