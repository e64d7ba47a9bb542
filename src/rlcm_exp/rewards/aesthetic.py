"""LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"): scores about 1..10.

    score = MLP(normalize(CLIP ViT-L/14 image embedding)),  MLP: 768-1024-128-64-16-1

The MLP has dropout between its first layers and no activations (the "linear" in its name: the
ReLUs are commented out in LAION's training code), so the layer indices of its state dict are
0, 2, 4, 6, 7 -- `layers.0.weight` ... `layers.7.bias`, which `AestheticHead` reproduces so the
public file loads without renaming.

The head's weights are fetched once from `head_url`, checked against the pinned `head_sha256`,
cached under `cache_dir`, and loaded with `torch.load(weights_only=True)` (or from safetensors),
so a swapped file can neither run code nor silently change the reward. Offline clusters point
`head_local_path` at a copy instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import TypedDict, Unpack

import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.clip import ClipEmbedder, load_clip_embedder
from rlcm_exp.rewards.hub import HubSource, ModelRuntime, describe_download, existing_path, runtime_settings
from rlcm_exp.rewards.scorer import EmbeddingHeadReward
from rlcm_exp.rewards.weights import file_sha256, load_state_into

# LAION's repository pinned at a commit, so the URL cannot move to another file under us
LAION_HEAD_URL = (
    "https://raw.githubusercontent.com/christophschuhmann/improved-aesthetic-predictor/"
    "6934dd81792f086e613a121dbce43082cb8be85e/sac+logos+ava1-l14-linearMSE.pth"
)
LAION_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"  # 3,714,759 bytes
_MAX_DOWNLOAD_BYTES = 256 * 2**20  # the real head is 3.7 MB; a wrong URL must not fill the disk


class AestheticHead(torch.nn.Module):
    """LAION's MLP, with the module indices of its public state dict (dropouts at 1, 3, 5)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) L2-normalised CLIP image embeddings -> (B,) scores."""
        return self.layers(embedding).squeeze(-1)


def default_cache_dir() -> Path:
    """$RLCM_EXP_CACHE, else $XDG_CACHE_HOME/rlcm_exp, else ~/.cache/rlcm_exp."""
    if "RLCM_EXP_CACHE" in os.environ:
        return Path(os.environ["RLCM_EXP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlcm_exp"


def _download(url: str, folder: Path, timeout_s: float) -> tuple[Path, str]:
    """Stream `url` into a temporary file in `folder`; returns (temp path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, name = tempfile.mkstemp(dir=folder, prefix=".download-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                size += len(block)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise OSError(f"more than {_MAX_DOWNLOAD_BYTES >> 20} MB; this is not an MLP head")
                digest.update(block)
                out.write(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def fetch_head_weights(
    url: str | None,
    sha256: str | None,
    local_path: str | None = None,
    cache_dir: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """The head's weight file on local disk: `local_path` if given, else the cached or freshly fetched `url`.

    The cache is content-addressed (the file is named by its sha256), written to a temporary name
    and renamed into place, so processes fetching at once never see a half-written file.
    """
    if local_path is not None:
        advice = (
            "Point it at a copy of the aesthetic head (e.g. sac+logos+ava1-l14-linearMSE.pth), or set it "
            "to null to fetch reward.head_url."
        )
        path = existing_path(local_path, "reward.head_local_path", False, advice)
        if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
            raise ConfigError(
                f"reward.head_local_path={local_path} has sha256 {actual}, but reward.head_sha256={sha256}. "
                "It is not the pinned file; replace it, or set reward.head_sha256=null to use your own head."
            )
        return path
    if url is None:
        raise ConfigError("reward.head_url and reward.head_local_path are both null; set one of them.")
    if sha256 is None:
        # a download without a pin could change the reward (or worse) without anyone noticing
        raise ConfigError(
            f"reward.head_sha256 is null but reward.head_url={url} is set: a downloaded head needs a pinned "
            "sha256. Set reward.head_sha256 to the file's sha256, or download it yourself and set "
            "reward.head_local_path (a local file may go unpinned)."
        )
    sha256 = sha256.lower()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "aesthetic"
    suffix = ".safetensors" if url.endswith(".safetensors") else ".pth"
    cached = folder / f"{sha256}{suffix}"
    if cached.is_file() and file_sha256(cached) == sha256:
        return cached
    try:
        tmp, actual = _download(url, folder, timeout_s)
    except Exception as err:
        raise ConfigError(
            f"could not fetch the aesthetic head from reward.head_url={url}: {type(err).__name__}: {err}. "
            "Without network access, download the file elsewhere and set reward.head_local_path=/path/to/file."
        ) from err
    if actual != sha256:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"reward.head_url={url} served a file with sha256 {actual}, but reward.head_sha256={sha256}: it is "
            "not the pinned aesthetic head (a moved URL or an HTML error page?), and was not used. Fix "
            "reward.head_url, or set reward.head_local_path to a verified copy."
        )
    os.replace(tmp, cached)
    return cached


class HeadSource(TypedDict, total=False):
    """Where the MLP head of an embedding + head reward comes from: the keys the LAION and v2.5 aesthetic
    rewards share, read by `head_weights` (the pinned URL and sha256 default to each reward's own file)."""

    head_url: str | None  # reward.head_url: where the head's weights are fetched once
    head_sha256: str | None  # reward.head_sha256: the sha256 the fetched (or local) file must have
    head_local_path: str | None  # reward.head_local_path: a local copy used instead of head_url
    cache_dir: str | None  # reward.cache_dir: folder of fetched heads (null: default_cache_dir()/aesthetic)
    download_timeout_s: float  # reward.download_timeout_s: seconds without data before a fetch gives up (60)


class HeadRewardSettings(ModelRuntime, HeadSource, total=False):
    """The keywords of an embedding + head reward beside its embedder's source, declared once: the runtime
    keys (rewards.hub.ModelRuntime) and the head's (HeadSource). Builders accept them as
    `**settings: Unpack[HeadRewardSettings]`."""


def head_weights(settings: HeadSource, url: str, sha256: str) -> tuple[Path, str]:
    """The head's weight file (`fetch_head_weights`) and what /health reports for it, from a builder's
    keywords; `url` and `sha256` are the builder's pinned file, the defaults of head_url and head_sha256."""
    url_, sha256_ = settings.get("head_url", url), settings.get("head_sha256", sha256)
    local_path = settings.get("head_local_path")
    path = fetch_head_weights(
        url_, sha256_, local_path, settings.get("cache_dir"), settings.get("download_timeout_s", 60.0)
    )
    return path, describe_download(url_, sha256_, local_path)


def load_head(path: Path, embed_dim: int = 768) -> AestheticHead:
    """Build the MLP and load a state dict saved by torch.save (tensors only) or as safetensors."""
    return load_state_into(AestheticHead(embed_dim), path, "the LAION aesthetic head")


class AestheticReward(EmbeddingHeadReward):
    """reward(images, prompts) -> (B,) LAION aesthetic scores; prompts are ignored.

    `scorer(images)` is the differentiable form (gradients reach the images). Calls are serialised
    by a lock: thread-safe, and one forward at a time bounds accelerator memory.
    """

    name = "aesthetic"
    embedder: ClipEmbedder
    head: AestheticHead


def aesthetic(
    clip_model_id: str | None = "openai/clip-vit-large-patch14",
    clip_revision: str = "main",
    clip_local_path: str | None = None,
    **settings: Unpack[HeadRewardSettings],
) -> AestheticReward:
    """The LAION aesthetic reward: CLIP ViT-L/14 image embedding -> L2 norm -> MLP head (HeadSource: by
    default LAION's file, fetched once and checked against its pinned sha256)."""
    dtype, device, batch_size = runtime_settings(settings, declared=HeadRewardSettings)
    path, head_source = head_weights(settings, LAION_HEAD_URL, LAION_HEAD_SHA256)
    clip = HubSource(clip_model_id, clip_revision, clip_local_path, "reward.clip_")
    embedder = load_clip_embedder(clip, with_tokenizer=False, dtype=dtype, device=device)
    embed_dim = embedder.model.config.projection_dim
    if embed_dim != 768:
        raise ConfigError(
            f"reward.clip_model_id={clip_model_id} (local_path {clip_local_path}) embeds images in "
            f"{embed_dim} dimensions, but the LAION aesthetic head takes CLIP ViT-L/14's 768."
        )
    head = load_head(path, embed_dim)
    return AestheticReward(
        embedder, head, batch_size, {"clip": clip.describe(), "aesthetic_head": head_source}
    )
