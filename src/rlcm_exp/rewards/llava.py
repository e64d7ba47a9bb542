"""Prompt-image alignment as the RLCM paper measures it: ask a VLM, compare its answer to the prompt.

    answer = LLaVA(image, "Answer concisely: what is going on in this image?")   (greedy, short)
    reward = BERTScore recall(answer, "The image contains {prompt}")             (see bertscore.py)

This is the in-process scorer. It is heavy (LLaVA-1.5-13B plus DeBERTa-xlarge), so the usual
way to run it is the reward server on its own GPU or machine:

    python -m rlcm_exp.reward_server reward=llava_bertscore port=8060

and `reward=remote` in the training run. The paper notes the 7B LLaVA often answered with an
empty string (BERTScore recall 0), hence the 13B default.

`reward=llava_bertscore_paper` sets what the paper's reference code did where this one differs by
default: each image re-encoded as JPEG quality 80 before the VLM, answers of up to 64 tokens,
the VLM in float16 (see that file for the one difference left: the conversation format).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any, Unpack

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.memory import VlmCall, free_memory, transformer_params, vlm_refusal
from rlcm_exp.models.precision import load_dtype
from rlcm_exp.rewards.base import check_images, check_prompts, encode_image, to_uint8
from rlcm_exp.rewards.bertscore import BertScorer, load_bertscore
from rlcm_exp.rewards.hub import HoldsModel, HubSource, ModelRuntime, load_with_processor, runtime_settings

QUESTION = "Answer concisely: what is going on in this image?"
LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # the llava-hf 1.5 conversation format
REFERENCE_TEMPLATE = "The image contains {prompt}"
TRANSPORTS = ("raw", "jpeg")


@dataclass(frozen=True)
class VlmQuery:
    """What the VLM is given for every image: one text prompt, an answer length, and the image as it
    travels to the model.

    image_transport "raw" hands the VLM the sampled pixels (8-bit, via `to_uint8`); "jpeg" first
    re-encodes each image as a JPEG of `jpeg_quality` and decodes it again, as the paper's reference
    client did (quality 80) before sending images to its LLaVA server.
    """

    question: str = QUESTION
    prompt_template: str = LLAVA_15_TEMPLATE
    max_new_tokens: int = 32
    image_transport: str = "raw"
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template or "<image>" not in self.prompt_template:
            raise ConfigError(
                f"reward.prompt_template={self.prompt_template!r} must contain '<image>' and '{{question}}', "
                f"e.g. {LLAVA_15_TEMPLATE!r} for LLaVA-1.5."
            )
        if self.max_new_tokens < 1:
            raise ConfigError(f"reward.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.image_transport not in TRANSPORTS:
            raise ConfigError(
                f"reward.image_transport={self.image_transport}: use raw (the pixels as sampled) or jpeg "
                "(re-encoded at reward.jpeg_quality first, as the paper's reference code)."
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"reward.jpeg_quality={self.jpeg_quality} must be in 1..100 (the paper: 80)")

    @property
    def text(self) -> str:
        """The text put to the VLM with every image."""
        return self.prompt_template.format(question=self.question)

    def images(self, images: torch.Tensor) -> list[Image.Image]:
        """(B, 3, H, W) in [0, 1] -> the B RGB images the VLM's processor receives."""
        arrays = to_uint8(images)
        if self.image_transport == "raw":
            return [Image.fromarray(a) for a in arrays]
        return [
            Image.open(io.BytesIO(encode_image(a, "jpeg", self.jpeg_quality)), formats=["JPEG"]).convert(
                "RGB"
            )
            for a in arrays
        ]

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Greedy decoding of at most max_new_tokens (it stops earlier at end of sequence)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": pad,
        }


class VlmAnswerer(HoldsModel):
    """Greedy short answers of an image-text-to-text model (LLaVA) to one fixed query; thread-safe."""

    def __init__(self, model: torch.nn.Module, processor: Any, query: VlmQuery, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"reward.batch_size={batch_size} must be >= 1")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # a decoder-only batch must be left-padded so every answer starts right after its prompt
        processor.tokenizer.padding_side = "left"
        self.query = query
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def answer(self, images: torch.Tensor) -> list[str]:
        """One answer per image, stripped of the prompt and special tokens."""
        pil = self.query.images(images)
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        with self._lock, torch.no_grad():
            for i in range(0, len(pil), self.batch_size):
                chunk = pil[i : i + self.batch_size]
                inputs = self.processor(
                    images=chunk, text=[self.query.text] * len(chunk), return_tensors="pt", padding=True
                )
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
                out = self.model.generate(**inputs, **self.query.generate_kwargs(tokenizer))  # type: ignore[operator]
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
        check_prompts(images, prompts)
        answers = self.answerer.answer(images)
        references = [self.reference_template.format(prompt=p) for p in prompts]
        return self.bertscore.recall(answers, references), answers

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_with_answers(images, prompts)[0]


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
    image_transport: str = "raw",
    jpeg_quality: int = 80,
    **runtime: Unpack[ModelRuntime],
) -> LlavaBertscoreReward:
    """The paper's prompt-alignment reward, in-process (the reward server runs exactly this).
    dtype "auto": float16 on CUDA (a 13B VLM in float32 does not fit the paper's 48 GB), else float32."""
    dtype, device, batch_size = runtime_settings(runtime, batch_size=16, dtype="auto")
    dtype = load_dtype(dtype, device)
    # the query is checked before the (large) models load, so a config mistake fails at once
    query = VlmQuery(question, prompt_template, max_new_tokens, image_transport, jpeg_quality)
    vlm = HubSource(vlm_model_id, vlm_revision, vlm_local_path, "reward.vlm_")
    bert = HubSource(bertscore_model_id, bertscore_revision, bertscore_local_path, "reward.bertscore_")
    check_fits(vlm, bert, query, batch_size, dtype, device)
    model, processor, vlm_source = load_with_processor(
        AutoModelForImageTextToText.from_pretrained, AutoProcessor.from_pretrained, vlm, dtype
    )
    answerer = VlmAnswerer(model.to(device), processor, query, batch_size)
    # BERTScore stays float32 whatever `dtype` is: it is small next to the VLM, and cosine
    # similarities of half-precision states would blur the small reward differences PPO learns from
    scorer, bert_source = load_bertscore(
        bertscore_model_id,
        bertscore_revision,
        bertscore_local_path,
        bertscore_num_layers,
        dtype="float32",
        device=device,
        batch_size=batch_size,
    )
    models = {"vlm": vlm_source, "bertscore": bert_source}
    return LlavaBertscoreReward(answerer, scorer, reference_template, models)


def _params(config: Any, head: bool) -> float:
    """A transformer config's parameter count (models/memory.transformer_params)."""
    gated = getattr(config, "hidden_act", "") == "silu"  # Llama-style SwiGLU: three MLP matrices
    vocab = getattr(config, "vocab_size", 0) if head else 0  # a vision tower has no vocabulary
    return transformer_params(
        config.hidden_size, config.num_hidden_layers, config.intermediate_size, vocab, gated, head
    )


def check_fits(
    vlm: HubSource, bert: HubSource, query: VlmQuery, batch_size: int, dtype: str, device: str
) -> None:
    """Refuse, before any weight loads, a VLM + BERTScore pair that cannot fit `device`'s free memory:
    the estimate reads only the two config.json files (models/memory.py)."""
    call = vlm_call(
        vlm.load(AutoConfig.from_pretrained), query, batch_size, dtype, bert.load(AutoConfig.from_pretrained)
    )
    why = vlm_refusal(call, free_memory(device))
    if why is not None:
        raise ConfigError(f"reward=llava_bertscore on {device}: {why}")


def vlm_call(vlm_config: Any, query: VlmQuery, batch_size: int, dtype: str, bert_config: Any) -> VlmCall:
    """The memory model's view of one generate call (models/memory.VlmCall) from the VLM's and
    BERTScore's configs: language model + vision tower + projector parameters, the language
    model's key/value width, the image's tokens and the question's (about 3 characters a token)."""
    text, vision = vlm_config.text_config, vlm_config.vision_config
    projector = vision.hidden_size * text.hidden_size + text.hidden_size**2
    params = _params(text, head=True) + _params(vision, head=False) + projector
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    image_tokens = (
        getattr(vlm_config, "image_seq_length", None) or (vision.image_size // vision.patch_size) ** 2
    )
    bert = transformer_params(
        bert_config.hidden_size, bert_config.num_hidden_layers, bert_config.intermediate_size,
        bert_config.vocab_size, gated=False, head=False,
    )  # fmt: skip
    return VlmCall(
        params_b=params / 1e9,
        layers=text.num_hidden_layers,
        kv_width=kv_heads * (text.hidden_size // heads),
        prompt_tokens=image_tokens + len(query.text) // 3 + 1,
        new_tokens=query.max_new_tokens,
        batch=batch_size,
        weight_bytes=4 if dtype == "float32" else 2,
        other_b=bert / 1e9,
    )
