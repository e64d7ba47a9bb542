"""BERTScore recall, written against transformers (no dependency on the bert-score package).

For a candidate c and a reference r, tokenised with the model's tokenizer:

    e_i = normalize(hidden state of layer L at token i)
    R   = 1/|r| * sum_{i in r} max_{j in c} <e_i(r), e_j(c)>    (greedy matching, each reference token
                                                               takes its most similar candidate token)

idf weighting off and no baseline rescaling, as the RLCM paper uses it with
microsoft/deberta-xlarge-mnli at layer 40 (the layer BERTScore's authors picked for that model by
correlation with human judgements). Token sets follow the reference implementation: the average
runs over the reference's words (its [CLS]/[SEP] have weight 0), while the max runs over all of
the candidate's tokens, [CLS]/[SEP] included. An empty candidate (special tokens only) scores 0.
One deliberate difference: padding is excluded from the max instead of counting as similarity 0,
so a score never depends on which other sentences share its batch.
"""

from __future__ import annotations

import threading
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.hub import HoldsModel, HubSource, ModelRuntime, load_with_processor, runtime_settings


def greedy_recall(
    ref_emb: torch.Tensor, ref_mask: torch.Tensor, cand_emb: torch.Tensor, cand_mask: torch.Tensor
) -> torch.Tensor:
    """BERTScore recall per pair from token embeddings.

    ref_emb (B, R, D), cand_emb (B, C, D): unit-norm token embeddings; masks (B, R), (B, C) are
    True on the tokens that count. Returns (B,) float32.
    """
    sim = torch.bmm(ref_emb.float(), cand_emb.float().transpose(1, 2))  # (B, R, C) cosine similarities
    # candidates that do not count can never be the max; -inf also marks "no candidate at all"
    sim = sim.masked_fill(~cand_mask[:, None, :], float("-inf"))
    best = sim.max(dim=2).values  # (B, R): each reference token's best match
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))  # empty candidate -> 0
    weights = ref_mask.float()
    return (best * weights).sum(1) / weights.sum(1).clamp(min=1)


class BertScorer(HoldsModel):
    """BERTScore recall of candidates against references with one transformers encoder; thread-safe."""

    def __init__(self, model: Any, tokenizer: Any, num_layers: int, batch_size: int) -> None:
        available = int(model.config.num_hidden_layers)
        if not 1 <= num_layers <= available:
            raise ConfigError(
                f"reward.bertscore_num_layers={num_layers}: the model has {available} layers; use 1..{available} "
                "(40 for microsoft/deberta-xlarge-mnli, BERTScore's default for it)."
            )
        if batch_size < 1:
            raise ConfigError(f"reward.batch_size={batch_size} must be >= 1")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.num_layers = num_layers
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) unit-norm layer-L states, (B, T) real-token mask, (B, T) word mask (no [CLS]/[SEP])."""
        max_len = min(getattr(self.tokenizer, "model_max_length", 512), 512)
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        out = self.model(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        # hidden_states[0] is the embedding layer, so index L is the output of the L-th layer
        emb = F.normalize(out.hidden_states[self.num_layers].float(), dim=-1)
        tokens = enc["attention_mask"].bool()
        words = tokens & ~enc["special_tokens_mask"].bool()
        return emb, tokens.to(emb.device), words.to(emb.device)

    def recall(self, candidates: list[str], references: list[str]) -> torch.Tensor:
        """(B,) float32 CPU BERTScore recall of candidates[i] against references[i]."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        out = []
        with self._lock, torch.no_grad():
            for i in range(0, len(candidates), self.batch_size):
                cand_emb, cand_tokens, cand_words = self._embed(candidates[i : i + self.batch_size])
                ref_emb, _, ref_words = self._embed(references[i : i + self.batch_size])
                recall = greedy_recall(ref_emb, ref_words, cand_emb, cand_tokens)
                # an empty answer would otherwise score its [CLS]/[SEP] similarity; it said nothing
                out.append(recall.masked_fill(~cand_words.any(dim=1), 0.0).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_bertscore(
    model_id: str | None = "microsoft/deberta-xlarge-mnli",
    revision: str = "main",
    local_path: str | None = None,
    num_layers: int = 40,
    key: str = "reward.bertscore_",
    **runtime: Unpack[ModelRuntime],
) -> tuple[BertScorer, str]:
    """Load the encoder and tokenizer; returns the scorer and a description for /health."""
    dtype, device, batch_size = runtime_settings(runtime)
    source = HubSource(model_id, revision, local_path, key)
    model, tokenizer, description = load_with_processor(
        AutoModel.from_pretrained, AutoTokenizer.from_pretrained, source, dtype
    )
    return BertScorer(model.to(device), tokenizer, num_layers, batch_size), description
