"""Turning a list of phrases into Grounding DINO text prompts, with each phrase's token span.

Grounding DINO reads categories as one sentence, ``"cat . dog . traffic light ."``: the ``.`` tokens
cut the text into sub-sentences so each name attends only to itself. The model scores every box
against every *token*, so to name a box we must know which tokens belong to which phrase. We take
that from the tokenizer's character offsets instead of decoding the tokens back to text (decoding
merges neighbouring phrases, e.g. ``"cat. dog. [SEP]"``).

The text encoder takes at most ``max_text_len`` tokens (256 for the released checkpoints); longer
label sets are split into several prompts, each run on its own and merged afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEPARATOR = " . "
_SPACES = re.compile(r"\s+")


class PromptError(ValueError):
    """A phrase cannot be turned into a prompt (empty, or longer than the text encoder takes)."""


@dataclass(frozen=True)
class PromptChunk:
    """One prompt sent to the model.

    ``phrase_ids[i]`` is the index (in the caller's phrase list) of the phrase whose tokens are
    ``input_ids[spans[i][0]:spans[i][1]]``.
    """

    text: str
    input_ids: tuple[int, ...]
    phrase_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]


def normalize_phrase(phrase: str) -> str:
    """Lower-case, collapse white space and drop the dots that would split a phrase in two."""
    cleaned = _SPACES.sub(" ", phrase.replace(".", " ")).strip().lower()
    if not cleaned:
        raise PromptError(f"empty phrase {phrase!r}: a label needs at least one word to detect")
    return cleaned


def build_prompts(phrases: Sequence[str], tokenizer: Any, max_tokens: int) -> list[PromptChunk]:
    """Pack ``phrases`` (already normalised) into as few prompts as fit in ``max_tokens`` tokens.

    Phrases keep their order. A single phrase that does not fit on its own raises PromptError.
    """
    if not phrases:
        raise PromptError("no phrases to detect: the labeling config has no labels")
    # Each phrase costs its own tokens plus one "." token; [CLS] and [SEP] cost two per prompt.
    costs = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in phrases]
    groups: list[list[int]] = []
    used = 2
    for index, cost in enumerate(costs):
        if cost + 2 > max_tokens:
            raise PromptError(
                f"phrase {phrases[index]!r} takes {cost - 1} tokens; the text encoder takes "
                f"{max_tokens - 3} at most for one phrase"
            )
        if not groups or used + cost > max_tokens:
            groups.append([])
            used = 2
        groups[-1].append(index)
        used += cost
    return [_encode_chunk([phrases[i] for i in group], group, tokenizer, max_tokens) for group in groups]


def _encode_chunk(phrases: list[str], phrase_ids: list[int], tokenizer: Any, max_tokens: int) -> PromptChunk:
    """Tokenise one prompt and locate each phrase's tokens through the character offsets."""
    starts: list[int] = []
    text = ""
    for phrase in phrases:
        if text:
            text += SEPARATOR
        starts.append(len(text))
        text += phrase
    text += " ."
    encoded = tokenizer(text, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    offsets = list(encoded["offset_mapping"])
    if len(input_ids) > max_tokens:
        # Tokenising phrases one by one and together can differ at the edges; never truncate silently.
        raise PromptError(f"prompt of {len(input_ids)} tokens exceeds the text encoder's {max_tokens}")
    spans: list[tuple[int, int]] = []
    for phrase, start in zip(phrases, starts, strict=True):
        end = start + len(phrase)
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        if not tokens:
            raise PromptError(f"phrase {phrase!r} produced no tokens")
        spans.append((tokens[0], tokens[-1] + 1))
    return PromptChunk(text=text, input_ids=tuple(input_ids), phrase_ids=tuple(phrase_ids), spans=tuple(spans))
