"""Prompt-image alignment as the RLCM paper measures it: ask a VLM, compare its answer to the prompt.

    answer = LLaVA(image, "Answer concisely: what is going on in this image?")   (greedy, short)
    reward = BERTScore recall(answer, "The image contains {prompt}")             (see bertscore.py)

This is the in-process scorer. It is heavy (LLaVA-1.5-13B plus DeBERTa-xlarge), so the usual
way to run it is the reward server on its own GPU or machine:

    python -m rlcm_exp.reward_server reward=llava_bertscore port=8060

and `reward=remote` in the training run. The paper notes the 7B LLaVA often answered with an
empty string (BERTScore recall 0), hence the 13B default.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.bertscore import BertScorer, load_bertscore
from rlcm_exp.rewards.clip import check_images, describe_source, load_pretrained, torch_dtype

QUESTION = "Answer concisely: what is going on in this image?"
LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # the llava-hf 1.5 conversation format
REFERENCE_TEMPLATE = "The image contains {prompt}"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images (uint8, rounded): what a VLM processor expects."""
    array = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in array]


class VlmAnswerer:
    """Greedy short answers of an image-text-to-text model (LLaVA) to one fixed question; thread-safe."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        question: str,
        prompt_template: str,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        if "{question}" not in prompt_template or "<image>" not in prompt_template:
            raise ConfigError(
                f"reward.prompt_template={prompt_template!r} must contain '<image>' and '{{question}}', e.g. "
                f"{LLAVA_15_TEMPLATE!r} for LLaVA-1.5."
            )
        if max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(
                f"reward.max_new_tokens={max_new_tokens} and reward.batch_size={batch_size} must be >= 1"
            )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # a decoder-only batch must be left-padded so every answer starts right after its prompt
        processor.tokenizer.padding_side = "left"
        self.prompt = prompt_template.format(question=question)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def answer(self, images: torch.Tensor) -> list[str]:
        """One answer per image, stripped of the prompt and special tokens."""
        pil = to_pil(images)
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        with self._lock, torch.no_grad():
            for i in range(0, len(pil), self.batch_size):
                chunk = pil[i : i + self.batch_size]
                inputs = self.processor(
                    images=chunk, text=[self.prompt] * len(chunk), return_tensors="pt", padding=True
                )
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
                out = self.model.generate(  # type: ignore[operator]
                    **inputs,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id
                    if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id,
                )
                new_tokens = out[:, inputs["input_ids"].shape[1] :]
                answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers


class LlavaBertscoreReward:
    """reward(images, prompts) -> (B,) BERTScore recall of the VLM's answer against the prompt's sentence."""

    def __init__(
        self, answerer: VlmAnswerer, bertscore: BertScorer, reference_template: str, models: dict[str, str]
    ):
        if "{prompt}" not in reference_template:
            raise ConfigError(
                f"reward.reference_template={reference_template!r} must contain '{{prompt}}', e.g. {REFERENCE_TEMPLATE!r}"
            )
        self.answerer = answerer
        self.bertscore = bertscore
        self.reference_template = reference_template
        self.models = models

    def score_with_answers(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Scores and the answers they came from (for logging and debugging a low reward)."""
        check_images(images, "llava_bertscore")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        answers = self.answerer.answer(images)
        references = [self.reference_template.format(prompt=p) for p in prompts]
        return self.bertscore.recall(answers, references), answers

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_with_answers(images, prompts)[0]


def load_vlm(
    model_id: str | None, revision: str, local_path: str | None, dtype: str, key: str = "reward.vlm_"
) -> tuple[torch.nn.Module, Any]:
    source: dict[str, Any] = {
        "model_id": model_id,
        "revision": revision,
        "local_path": local_path,
        "key": key,
    }
    processor = load_pretrained(AutoProcessor.from_pretrained, **source)
    model = load_pretrained(AutoModelForImageTextToText.from_pretrained, **source, dtype=torch_dtype(dtype))
    return model, processor


def llava_bertscore(
    vlm_model_id: str | None = "llava-hf/llava-1.5-13b-hf",
    vlm_revision: str = "main",
    vlm_local_path: str | None = None,
    question: str = QUESTION,
    prompt_template: str = LLAVA_15_TEMPLATE,
    max_new_tokens: int = 32,
    bertscore_model_id: str | None = "microsoft/deberta-xlarge-mnli",
    bertscore_revision: str = "main",
    bertscore_local_path: str | None = None,
    bertscore_num_layers: int = 40,
    reference_template: str = REFERENCE_TEMPLATE,
    dtype: str = "float32",
    device: str = "cpu",
    batch_size: int = 16,
) -> LlavaBertscoreReward:
    """The paper's prompt-alignment reward, in-process (the reward server runs exactly this)."""
    model, processor = load_vlm(vlm_model_id, vlm_revision, vlm_local_path, dtype)
    answerer = VlmAnswerer(model.to(device), processor, question, prompt_template, max_new_tokens, batch_size)
    # BERTScore stays float32 whatever `dtype` is: it is small next to the VLM, and cosine
    # similarities of half-precision states would blur the small reward differences PPO learns from
    scorer, bert_source = load_bertscore(
        bertscore_model_id,
        bertscore_revision,
        bertscore_local_path,
        bertscore_num_layers,
        "float32",
        device,
        batch_size,
    )
    models = {"vlm": describe_source(vlm_model_id, vlm_revision, vlm_local_path), "bertscore": bert_source}
    return LlavaBertscoreReward(answerer, scorer, reference_template, models)
