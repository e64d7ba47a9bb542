"""OCR reward (text rendering, as Flow-GRPO's OCR task scores it): does the image show the text the
prompt quotes?

    target     = the text between the first pair of double quotes of the prompt
                 ('a sign that says "Hello World"' -> 'Hello World'; typographic quotes too)
    recognised = every text line the OCR model reads in the image, joined in reading order
    both compared case-insensitively with spaces removed (lower-cased, ' ' deleted)
    d          = 0 if substring_match and target occurs in recognised, else
                 Levenshtein(recognised, target) (insertions, deletions, substitutions, cost 1 each)
    reward     = 1 - min(d, len(target)) / max(len(target), 1)          in [0, 1]

This is Flow-GRPO's formula (flow_grpo/ocr.py): the same target, the same normalisation, the same
substring rule and the same clip of d to len(target) (so reading many unrelated characters costs no
more than reading nothing). Differences: the OCR model is PP-OCRv4 run by RapidOCR with ONNX
Runtime on the CPU (Flow-GRPO runs PaddleOCR's English PP-OCRv4 in Paddle; `rec_model_path` and
`rec_keys_path` take another recognition model), images reach it as 8-bit BGR (`to_uint8`), and an
OCR failure raises instead of scoring 0.

A prompt without a quoted text is handled by `missing_quotes`: `error` (default: a ValueError
naming the prompt and this reward), `whole_prompt` (the whole prompt is the target) or `nan` (a
non-finite reward: the trainer counts it and gives that image zero advantage).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any

import numpy as np
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_images, check_prompts, to_uint8

MISSING_QUOTES = ("error", "whole_prompt", "nan")
# "..." or “...” (the first pair wins; the text inside may be empty)
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def quoted_text(prompt: str, missing_quotes: str = "error") -> str | None:
    """The text between the first pair of double quotes of `prompt`; without one, by `missing_quotes`:
    `error` raises ValueError, `whole_prompt` returns the prompt, `nan` returns None (no target)."""
    match = _QUOTED.search(prompt)
    if match:
        return match.group(1) if match.group(1) is not None else match.group(2)
    if missing_quotes == "whole_prompt":
        return prompt
    if missing_quotes == "nan":
        return None
    raise ValueError(
        f"the ocr reward needs the text to render in double quotes in each prompt, e.g. "
        f"'a sign that says \"hello\"'; prompt {prompt!r} has none (reward.missing_quotes=whole_prompt "
        "scores such prompts against the whole prompt, reward.missing_quotes=nan skips them)"
    )


def normalise(text: str) -> str:
    """Flow-GRPO's comparison form: lower case, spaces removed."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_score(recognised: str, target: str, substring_match: bool = True) -> float:
    """1 - min(d, len(target)) / max(len(target), 1) on the normalised texts (see the module docstring)."""
    recognised, target = normalise(recognised), normalise(target)
    d = 0 if substring_match and target in recognised else levenshtein(recognised, target)
    return 1.0 - min(d, len(target)) / max(len(target), 1)


class OcrReward:
    """reward(images, prompts) -> (B,) OCR scores in [0, 1] (NaN for a prompt skipped by missing_quotes=nan).

    `engine` is a RapidOCR instance (`engine(bgr_uint8) -> (lines or None, timings)`, each line
    [box, text, confidence]). Calls are serialised by a lock: thread-safe, one OCR at a time.
    """

    def __init__(
        self,
        engine: Any,
        missing_quotes: str,
        substring_match: bool,
        models: dict[str, str],
    ) -> None:
        if missing_quotes not in MISSING_QUOTES:
            raise ConfigError(
                f"reward.missing_quotes={missing_quotes} must be one of {', '.join(MISSING_QUOTES)}"
            )
        self.engine, self.models = engine, models
        self.missing_quotes, self.substring_match = missing_quotes, substring_match
        self._lock = threading.Lock()

    def read(self, image: np.ndarray) -> str:
        """The text of one (H, W, 3) RGB uint8 image: every line the OCR reads, in reading order, joined."""
        with self._lock:
            lines, _ = self.engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR takes BGR arrays
        return "".join(str(line[1]) for line in lines or [])

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, "ocr")
        check_prompts(images, prompts)
        targets = [quoted_text(p, self.missing_quotes) for p in prompts]  # a bad prompt fails before any OCR
        scores = []
        for image, target in zip(to_uint8(images), targets, strict=True):
            if target is None:
                scores.append(math.nan)
            else:
                scores.append(ocr_score(self.read(image), target, self.substring_match))
        return torch.tensor(scores, dtype=torch.float32)


def ocr(
    missing_quotes: str = "error",
    substring_match: bool = True,
    min_confidence: float = 0.0,
    det_limit_side_len: int = 960,
    det_model_path: str | None = None,
    rec_model_path: str | None = None,
    rec_keys_path: str | None = None,
    num_threads: int | None = None,
) -> OcrReward:
    """The OCR reward with RapidOCR's PP-OCRv4 ONNX models (shipped in the rapidocr-onnxruntime wheel,
    so nothing is downloaded); see the module docstring for the score."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise ConfigError(
            "reward=ocr needs rapidocr-onnxruntime: pip install -e '.[rewards]' (or pip install rapidocr-onnxruntime)"
        ) from err
    if det_limit_side_len < 32 or (num_threads is not None and num_threads < 1):
        raise ConfigError(
            f"reward.det_limit_side_len={det_limit_side_len} must be >= 32 and reward.num_threads={num_threads} "
            "null or >= 1"
        )
    options: dict[str, Any] = {
        "use_cls": False,  # Flow-GRPO: use_angle_cls=False, no rotated-text classifier
        "text_score": min_confidence,
        "det_limit_side_len": det_limit_side_len,
        "det_limit_type": "max",  # shrink only images larger than det_limit_side_len (PaddleOCR's default)
    }
    paths = {
        "det_model_path": det_model_path,
        "rec_model_path": rec_model_path,
        "rec_keys_path": rec_keys_path,
    }
    options |= {k: v for k, v in paths.items() if v}
    if num_threads is not None:
        options |= {"intra_op_num_threads": num_threads, "inter_op_num_threads": 1}
    engine = RapidOCR(**options)
    models = {
        "ocr_det": det_model_path or "rapidocr-onnxruntime ch_PP-OCRv4_det_infer.onnx",
        "ocr_rec": rec_model_path or "rapidocr-onnxruntime ch_PP-OCRv4_rec_infer.onnx",
    }
    return OcrReward(engine, missing_quotes, substring_match, models)
