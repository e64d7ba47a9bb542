"""Reading a /score request: its JSON, its images (opened by PIL under a pixel limit, PNG and JPEG
only, nothing unpickled) and prompts; and the JSON answer."""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlcm_exp.serving.batcher import Scored

# Values (commas, arrays, objects) a /score body may hold: a real one holds about two per image
# and per prompt. Bounds the memory json.loads may build from a small body ("[{},{},...]" turns
# 3 bytes into a 64-byte dict): at most ~25 MB for this many empty containers.
_MAX_JSON_VALUES = 1 << 18


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _too_large(message: str) -> RequestError:
    return RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)


def open_images(
    items: Any, max_pixels: int, max_request_pixels: int | None = None
) -> tuple[list[Image.Image], int]:
    """A JSON list of base64 PNG/JPEG strings -> the images opened (only their headers read, no pixel
    decoded yet) and their total pixel count; 400/413 for bad, mixed-size or too many pixels."""
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'images' must be a non-empty list of base64 strings")
    opened: list[Image.Image] = []
    total = 0
    for i, text in enumerate(items):
        try:
            raw = base64.b64decode(text, validate=True)
            # formats=: PIL tries no other decoder, so only PNG and JPEG parsers ever see client bytes
            image = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
        except Image.DecompressionBombError as err:  # declared dimensions far over PIL's own limit
            raise _too_large(f"image {i}: {err}; over max_pixels={max_pixels}") from err
        except Exception as err:  # binascii.Error, UnidentifiedImageError, and PIL's parser errors
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"image {i} is not a base64 PNG or JPEG: {err}"
            ) from err
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise _too_large(f"image {i} has {width}x{height} pixels, over max_pixels={max_pixels}")
        if image.size != (first := opened[0] if opened else image).size:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"image {i} is {width}x{height} but image 0 is {first.size[0]}x{first.size[1]}; "
                "one request holds images of one size",
            )
        total += width * height
        if max_request_pixels is not None and total > max_request_pixels:
            raise _too_large(
                f"the request's {len(items)} images have over max_request_pixels={max_request_pixels} "
                f"pixels together ({len(items)} x {width}x{height}); send fewer images per request "
                "(reward.max_images_per_request)"
            )
        opened.append(image)
    return opened, total


def decode_opened(opened: list[Image.Image]) -> torch.Tensor:
    """Images of one size from `open_images` -> (B, 3, H, W) float32 in [0, 1]; 400 if one does not decode."""
    width, height = opened[0].size
    pixels = np.empty((len(opened), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(opened):
        try:
            pixels[i] = np.asarray(image.convert("RGB"))
        except Exception as err:  # truncated or corrupt data: PIL raises OSError, ValueError, SyntaxError...
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image {i} could not be decoded: {err}") from err
        finally:
            image.close()
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)


def decode_images(items: Any, max_pixels: int, max_request_pixels: int | None = None) -> torch.Tensor:
    """A JSON list of base64 PNG/JPEG strings -> (B, 3, H, W) float32 in [0, 1]; all images one size."""
    return decode_opened(open_images(items, max_pixels, max_request_pixels)[0])


def load_json(body: bytes | bytearray) -> Any:
    """json.loads of a request body, refusing (400) bodies that would build far more objects than
    their size suggests, or nest so deep that the parser recurses out."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") > _MAX_JSON_VALUES:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body holds over {_MAX_JSON_VALUES} JSON values")
    try:
        return json.loads(body)
    except RecursionError as err:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body's JSON is nested too deeply") from err
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError, too many int digits
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {err}") from err


@dataclass
class OpenedRequest:
    images: list[Image.Image]  # opened, not decoded (decode_opened)
    prompts: list[str]
    pixels: int  # what decoding them will hold, in pixels


def open_score_request(
    body: bytes | bytearray, max_pixels: int, max_request_pixels: int | None
) -> OpenedRequest:
    """A /score body -> its images opened (not decoded) and prompts; RequestError (400/413) when malformed."""
    request = load_json(body)
    if not isinstance(request, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'prompts' must be a list of strings")
    images, pixels = open_images(request.get("images"), max_pixels, max_request_pixels)
    if len(prompts) != len(images):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{len(images)} images but {len(prompts)} prompts")
    return OpenedRequest(images, prompts, pixels)


def parse_score_request(
    body: bytes, max_pixels: int, max_request_pixels: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """A /score body -> (images, prompts); RequestError (400/413) when it is malformed."""
    opened = open_score_request(body, max_pixels, max_request_pixels)
    return decode_opened(opened.images), opened.prompts


def _json_numbers(t: torch.Tensor) -> list[float | None]:
    # JSON has no NaN/inf: non-finite scores travel as null and the client turns them back into NaN
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


def score_answer(scored: Scored) -> dict[str, Any]:
    """The /score answer: {"rewards": [...], "status": [...], "components": {name: [...]}}
    (components only if any); status is "ok" per scored item, else why it was not scored."""
    scores = scored.scores
    payload: dict[str, Any] = {"rewards": _json_numbers(scores["reward"]), "status": scored.status}
    components = {k: _json_numbers(v) for k, v in scores.items() if k != "reward"}
    if components:
        payload["components"] = components
    return payload
