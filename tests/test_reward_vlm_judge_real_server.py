"""The VLM judge against a REAL OpenAI-compatible server: `transformers serve` (the installed
transformers' own FastAPI server, started as a subprocess on 127.0.0.1) serving two tiny LLaVAs built
here from a config with random weights (seed 0): a 2-layer CLIP ViT on 32x32 images in 8x8 patches (16
image tokens), a 2-layer Llama, a WordLevel tokenizer of 50 words (yes, no, 1..10, the templates' words)
with a chat template, saved with save_pretrained into tmp folders; the second ("yes/no") has an output
layer that can only say yes or no (its rows for yes and no are w and -w, every other row 0), so its
answer is yes or no, which one depending on the image. The server loads each on its first request (no
model is pinned on its command line). Nothing is downloaded.

What the server does with the judge's requests is checked against what it answers to the same request
sent by hand (temperature 0 is greedy decoding, so both answers are the same):

- rubric: the random model answers some text (with seed 0, "number 7. an the the ..."). The judge's score
  must be `rubric_score` of that text, or, when the text has no number from 1 to 10, the judge must raise
  the documented one-line error naming the answer. Generation is NOT constrained: transformers serve has
  no guided decoding for chat completions.
- yes_no: transformers serve (5.x) lists `logprobs` and `top_logprobs` among the chat-completion fields it
  ignores (with the warning "Ignoring unsupported fields in the request") and answers `"logprobs": null`,
  so the judge must raise its documented error (no top logprobs; use reward.mode=rubric or
  reward.missing_logprobs=answer_text). If a later transformers sends them, the judge's P(yes) must
  instead be `yes_probability` of the first token's alternatives, in [0, 1] (or the documented error when
  neither yes nor no is among them).
- yes_no with missing_logprobs=answer_text, on the yes/no model: each score is `answer_text_score` of
  the server's answer (1 for yes, 0 for no), every image is flagged in `yes_no_from_text`, and a warning
  says so.

Both modes check that the image reached the model: the prompt counts the 16 image tokens.
Skipped only when the serving extra is missing (pip install 'transformers[serving]'; the `rewards`
extra brings it). One server for the module; about 40-80 s on a 2-core CPU, most of it the server's start and its loading
of each model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.rewards.base import build_reward, to_uint8
from rlcm_exp.rewards.vlm_judge import (
    VlmJudge,
    VlmJudgeError,
    answer_text_score,
    image_data_url,
    rubric_score,
    yes_probability,
)

from .helpers import free_port

pytestmark = pytest.mark.subprocess  # every test here talks to a server process

pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="transformers serve needs pip install 'transformers[serving]'")
pytest.importorskip("uvicorn", reason="transformers serve needs pip install 'transformers[serving]'")

PROMPTS = ["a red square", "a blue circle", "a red star"]
SIDE, PATCH = 32, 8
IMAGE_TOKENS = (SIDE // PATCH) ** 2
WORDS = (
    "yes no Yes No 1 2 3 4 5 6 7 8 9 10 USER ASSISTANT : ? . , a an the this image show does Does "
    "answer Answer or On scale from to how well red blue square circle star with number only"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(folder: Path, yes_no_only: bool = False) -> None:
    """A LLaVA with random weights, its processor (CLIP image processor, WordLevel tokenizer, chat
    template), saved in `folder`: what transformers serve loads as a vision-language model. With
    `yes_no_only`, the output layer's row for "yes" is a random w, for "no" -w, every other row 0: the
    logits are (h.w, -h.w, 0, ...), so greedy decoding answers "yes" when h.w > 0, else "no"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", "<image>", *WORDS]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=PATCH,
        vision_feature_select_strategy="default",  # the CLS token dropped: 16 image tokens
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    ids = dict(bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIDE,
            patch_size=PATCH,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **ids,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    if yes_no_only:
        with torch.no_grad():
            head = model.lm_head.weight
            w = torch.randn(head.shape[1])
            head.zero_()
            head[vocab["yes"]], head[vocab["no"]] = w, -w
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(base_url, {"text": model name, "yes_no": model name}): transformers serve on 127.0.0.1, serving
    the two tiny LLaVAs by their folders' paths (each loaded on its first request)."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    yes_no = tmp_path_factory.mktemp("tiny_llava_yes_no")
    build_tiny_llava(folder)
    build_tiny_llava(yes_no, yes_no_only=True)
    port = free_port()
    log_path = folder / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        base_url, models = f"http://127.0.0.1:{port}/v1", {"text": str(folder), "yes_no": str(yes_no)}
        with ThreadPoolExecutor(2) as pool:  # both models load at once (each in its own process)
            list(pool.map(lambda m: warm_up(base_url, m), models.values()))
        yield base_url, models
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def warm_up(base_url: str, model: str) -> None:
    """One chat completion (a grey image and a question), so that the server loads `model` now."""
    image = image_data_url(np.full((SIDE, SIDE, 3), 128, dtype=np.uint8))
    content = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "Does this image show a red square?"},
    ]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    request = urllib.request.Request(
        f"{base_url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=180) as answer:
        assert answer.status == 200


def judge(served: tuple[str, dict[str, str]], *overrides: str, model: str = "text") -> VlmJudge:
    base_url, models = served
    cfg = compose(
        "config",
        [
            "reward=vlm_judge",
            f"reward.base_url={base_url}",
            f"reward.model={models[model]}",
            "reward.timeout_s=60",
            "reward.max_retries=0",
            "reward.max_concurrency=2",
            *overrides,
        ],
    )
    built = build_reward(cfg.reward, "cpu")
    assert isinstance(built, VlmJudge)
    return built


def images() -> torch.Tensor:
    """Three 24x24 images, different from each other (the processor resizes them to 32x32)."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(len(PROMPTS), 3, 24, 24, generator=generator)


def by_hand(reward: VlmJudge, x: torch.Tensor) -> list:
    """The server's answer to each of the judge's requests, sent once more with the judge's own
    request (the same messages and options); checks that the image tokens reached the model."""
    answers = []
    for pixels, prompt in zip(to_uint8(x), PROMPTS, strict=True):
        answer = reward._request(image_data_url(pixels), reward.question(prompt))
        assert len(answer.choices) == 1
        assert answer.usage.prompt_tokens > IMAGE_TOKENS + len(reward.question(prompt).split())
        answers.append(answer)
    return answers


def test_rubric_against_transformers_serve(served):
    reward = judge(served, "reward.mode=rubric")
    x = images()
    texts = [a.choices[0].message.content for a in by_hand(reward, x)]
    expected = [rubric_score(t or "", 1, 10) for t in texts]
    print(f"transformers serve's rubric answers: {texts}")  # shown with pytest -s
    if all(e is not None for e in expected):
        scores = reward(x, PROMPTS)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        torch.testing.assert_close(
            scores.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert ((scores >= 0) & (scores <= 1)).all()
    else:  # the first answer without a number in range is the one the error names
        i = next(i for i, e in enumerate(expected) if e is None)
        with pytest.raises(VlmJudgeError) as info:
            reward(x, PROMPTS)
        message = str(info.value)
        assert "\n" not in message and served[0] in message
        assert f"for prompt {PROMPTS[i]!r}: no number from 1 to 10 in it" in message
        assert " ".join(texts[i].split())[:300] in message


def test_yes_no_against_transformers_serve(served):
    reward = judge(served)
    x = images()
    answers = by_hand(reward, x)
    if all(a.choices[0].logprobs is None for a in answers):  # transformers serve 5.x ignores logprobs
        with pytest.raises(VlmJudgeError) as info:
            reward(x, PROMPTS)
        message = str(info.value)
        assert "\n" not in message and served[0] in message
        assert "sent no top logprobs for the answer to prompt" in message and "reward.mode=rubric" in message
        return
    expected = [
        yes_probability([(t.token, t.logprob) for t in a.choices[0].logprobs.content[0].top_logprobs])
        for a in answers
    ]
    if any(e is None for e in expected):
        with pytest.raises(VlmJudgeError, match="neither yes nor no among the top"):
            reward(x, PROMPTS)
        return
    scores = reward(x, PROMPTS)
    torch.testing.assert_close(
        scores.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert ((scores >= 0) & (scores <= 1)).all()


def test_yes_no_from_the_answer_text_against_transformers_serve(served, caplog):
    reward = judge(served, "reward.missing_logprobs=answer_text", model="yes_no")
    x = images()
    answers = by_hand(reward, x)
    texts = [a.choices[0].message.content for a in answers]
    print(f"transformers serve's yes/no answers: {texts}")  # shown with pytest -s
    with caplog.at_level("WARNING"):
        out = reward(x, PROMPTS)
    assert isinstance(out, dict) and set(out) == {"reward", "yes_no_from_text"}
    if any(a.choices[0].logprobs is not None for a in answers):  # a transformers that sends logprobs
        expected = [
            yes_probability([(t.token, t.logprob) for t in a.choices[0].logprobs.content[0].top_logprobs])
            for a in answers
        ]
        torch.testing.assert_close(out["reward"].double(), torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(out["yes_no_from_text"], torch.zeros(3))
        return
    assert all(t.strip().lower() in ("yes", "no") for t in texts)  # the yes/no model says nothing else
    expected = [answer_text_score(t) for t in texts]
    torch.testing.assert_close(out["reward"], torch.tensor(expected, dtype=torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(out["yes_no_from_text"], torch.ones(3), atol=0, rtol=0)
    assert any("yes_no scores are read from the answers' text" in r.getMessage() for r in caplog.records)
