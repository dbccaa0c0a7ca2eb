"""How a row that does not decode greedily picks its next token from a step's logits.

Greedy rows never come here: the decoding step's own argmax is their token, and a batch of greedy rows runs
exactly as before (graphs, overlap). A row with sampling options or a grammar gets, per step, the logits the
step left in its buffer, processed in the order vLLM and OpenAI define:
penalties -> grammar mask -> (temperature 0: argmax) -> temperature -> top-k -> top-p -> a draw from the row's
own generator (``seed`` makes it reproducible on the same device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (the default and the fast path)
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI: minus count x this, per token already generated
    presence_penalty: float = 0.0  # OpenAI: minus this once, per token already generated
    repetition_penalty: float = 1.0  # vLLM/HF: logits of tokens in the prompt or the answer divided (>0) or multiplied

    @property
    def is_greedy(self) -> bool:
        return (self.temperature < SAMPLING_EPS and self.frequency_penalty == 0 and self.presence_penalty == 0
                and self.repetition_penalty == 1)


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): dividing logits by less overflows float32 to
# infinities, whose softmax is NaN, and a NaN "draw" is token 0.
SAMPLING_EPS = 1e-5
GREEDY = SamplingParams()
NUCLEUS_CANDIDATES = 256  # tokens a top-p cut looks at before it sorts the whole vocabulary


class RowSampler:
    """One sequence's token choice when it is not plain greedy: its options, its random generator (made on
    the logits' device at the first draw), and its grammar matcher (structured output), if any."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor | None = None, matcher: Any = None):
        self.params = params
        self.matcher = matcher  # grammar.GrammarMatcher-like: fill_mask / accept / finished
        self._prompt_ids = prompt_ids.flatten().unique() if prompt_ids is not None else None
        self._generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        """The grammar is complete and has taken its stop token: the answer is whole."""
        return self.matcher is not None and self.matcher.finished

    def choose(self, logits: torch.Tensor, generated: list[int]) -> int:
        """The next token from this row's logits ``[vocab]`` (not changed in place), ``generated`` so far."""
        scores = self.scores(logits, generated)
        if self.params.temperature < SAMPLING_EPS:
            token = int(scores.argmax())
        else:
            token = self._draw(scores / self.params.temperature)
        if self.matcher is not None:
            self.matcher.accept(token)
        return token

    def scores(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """The logits with the penalties applied and the tokens the grammar forbids at -inf (float32 copy)."""
        params = self.params
        scores = logits.float()  # a copy when the step's dtype is lower; copied below otherwise
        if scores.data_ptr() == logits.data_ptr():
            scores = scores.clone()
        if params.repetition_penalty != 1:
            seen = self._seen(generated, scores.device)
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                       picked * params.repetition_penalty)
        if generated and (params.frequency_penalty or params.presence_penalty):
            counts = torch.bincount(torch.tensor(generated, device=scores.device), minlength=scores.shape[0])
            counts = counts[:scores.shape[0]].to(scores.dtype)
            scores -= counts * params.frequency_penalty + (counts > 0).to(scores.dtype) * params.presence_penalty
        if self.matcher is not None:
            self.matcher.mask(scores)
        return scores

    def _seen(self, generated: list[int], device: torch.device) -> torch.Tensor:
        ids = torch.tensor(generated, dtype=torch.long, device=device)
        if self._prompt_ids is not None:
            ids = torch.cat([self._prompt_ids.to(device), ids])
        return ids.unique()

    def _draw(self, scores: torch.Tensor) -> int:
        """A token drawn from softmax(scores) cut to top-k (renormalized), then to the top-p nucleus.

        The cuts work on the few hundred most likely tokens, not a sort of the whole vocabulary (13 ms on a CPU
        for 151,936 logits): the nucleus is nearly always inside them, and when it is not, the whole vocabulary
        is sorted after all, so the result is exact either way."""
        params = self.params
        size = scores.shape[0]
        top_k = params.top_k if 0 < params.top_k < size else 0
        if not top_k and params.top_p >= 1:  # the whole distribution: exponential race, no sort, no cumsum
            return int((scores.softmax(dim=-1) / self._exponential(scores)).argmax())
        values, index = scores.topk(top_k or min(NUCLEUS_CANDIDATES, size))
        # Probabilities of the candidates: within the top-k when there is one, else of the whole vocabulary.
        probs = values.softmax(dim=-1) if top_k else (values - scores.logsumexp(dim=-1)).exp()
        if params.top_p < 1:
            if not top_k and probs.sum() < params.top_p and index.shape[0] < size:
                values, index = scores.sort(descending=True)
                probs = (values - scores.logsumexp(dim=-1)).exp()
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, 0)
        return int(index[(probs / self._exponential(probs)).argmax()])

    def _exponential(self, like: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise from this row's generator: argmax(p / noise) is a draw from p (what vLLM does)."""
        if self._generator is None:
            self._generator = torch.Generator(device=like.device)
            if self.params.seed is not None:
                self._generator.manual_seed(self.params.seed)
            else:
                self._generator.seed()
        return torch.empty_like(like, dtype=torch.float32).exponential_(generator=self._generator)
