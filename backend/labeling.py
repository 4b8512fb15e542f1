"""What a Label Studio labeling config asks of the detector.

From the project's XML we need: the ``<RectangleLabels>`` control (its ``name`` is the result's
``from_name``), the ``<Image>`` it points at (``to_name``, and the task data key holding the image
URL), the labels with the phrases to detect for each, and an optional ``<TextArea>`` on the same image
where an annotator types a prompt. Parsing uses Label Studio's own parser (``label-studio-sdk``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from model import PromptError, normalize_phrase

log = logging.getLogger(__name__)

_PROMPT_SPLIT = re.compile(r"[.,;\n]+")
_SDK_CONFIG_ERRORS = frozenset(
    {"LabelStudioXMLSyntaxErrorSentryIgnored", "LabelStudioValidationErrorSentryIgnored", "LSConfigParseException",
     "XMLSyntaxError"}
)  # fmt: skip
_WORD = re.compile(r"[a-z0-9]+")


class LabelConfigError(ValueError):
    """The labeling config (or a typed prompt) cannot drive the detector: no rectangle labels on an
    image, no labels, or more than a limit allows (the message names the limit's setting)."""


@dataclass(frozen=True)
class LabelLimits:
    """How much one config or typed prompt may ask of the detector (its work grows with the phrases).

    Each is a setting (``DINOLABEL_MAX_LABELS``...); past one, parsing refuses with the limit's name.
    """

    labels: int
    phrases: int
    prompt_phrases: int
    phrase_length: int


@dataclass(frozen=True)
class LabelTarget:
    """The control the detector fills in, with one or more phrases per label.

    ``phrase_label[i]`` is the index in ``labels`` of the label that phrase ``phrases[i]`` detects.
    A label's phrases are its ``predicted_values`` (comma-separated) when it has them, else its name.
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    phrases: tuple[str, ...]
    phrase_label: tuple[int, ...]
    prompt_from_name: str | None = None


def parse_label_config(xml: str, limits: LabelLimits | None = None) -> LabelTarget:
    """Find the first ``<RectangleLabels>`` that points at an ``<Image>`` and describe it.

    With ``limits`` (the API checks them before queueing work), a config past one is refused.
    """
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises a variety of XML/validation errors
        if type(exc).__name__ in _SDK_CONFIG_ERRORS:  # they describe the client's XML: worth showing
            raise LabelConfigError(f"cannot parse the labeling config: {exc}") from exc
        log.warning("the SDK failed on a labeling config: %s: %s", type(exc).__name__, exc)
        raise LabelConfigError("cannot parse the labeling config (not a Label Studio labeling config)") from exc
    images = {obj.name: obj for obj in interface.objects if type(obj).__name__ == "ImageTag"}
    for control in interface.controls:
        if type(control).__name__ != "RectangleLabelsTag":
            continue
        to_name = next((name for name in control.to_name if name in images), None)
        if to_name is None:
            continue
        return _describe(control, to_name, images[to_name], interface, limits)
    raise LabelConfigError("the labeling config needs a <RectangleLabels> control on an <Image>")


def image_key(xml: str) -> str:
    """The task data key of the config's first ``<Image>`` (``$image`` -> ``image``): what an index job embeds.

    Any config with an image will do (no ``<RectangleLabels>`` needed: a project may be indexed without
    being pre-annotated).
    """
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises a variety of XML/validation errors
        raise LabelConfigError("cannot parse the labeling config (not a Label Studio labeling config)") from exc
    for obj in interface.objects:
        value = str(getattr(obj, "value", "") or "")
        if type(obj).__name__ == "ImageTag" and value.startswith("$") and len(value) > 1:
            return value[1:]
    raise LabelConfigError("the labeling config has no <Image> with a $key value: nothing to index")


def _describe(
    control: Any, to_name: str, image: Any, interface: LabelInterface, limits: LabelLimits | None
) -> LabelTarget:
    labels = tuple(dict.fromkeys(control.labels))
    if not labels:
        raise LabelConfigError(f"<RectangleLabels name={control.name!r}> has no <Label> values")
    if limits is not None:
        _check_labels(control.name, labels, limits)
    phrases: list[str] = []
    phrase_label: list[int] = []
    seen: set[str] = set()
    for index, label in enumerate(labels):
        attrs: Mapping[str, Any] = getattr(control.labels_attrs.get(label), "attr", None) or {}
        wanted = str(attrs.get("predicted_values") or label).split(",")
        for raw in wanted:
            try:
                phrase = normalize_phrase(raw)
            except PromptError:
                continue
            if limits is not None and len(phrase) > limits.phrase_length:
                raise LabelConfigError(
                    f"label {_short(label)!r} has a phrase of {len(phrase)} characters; at most "
                    f"{limits.phrase_length} are served (DINOLABEL_MAX_PHRASE_LENGTH)"
                )
            if phrase not in seen:  # one phrase cannot name two labels: the first label keeps it
                seen.add(phrase)
                phrases.append(phrase)
                phrase_label.append(index)
        if limits is not None and len(phrases) > limits.phrases:
            raise LabelConfigError(
                f"the labels of {control.name!r} give more than {limits.phrases} phrases to detect (labels and "
                "their predicted_values); that is the most served (DINOLABEL_MAX_PHRASES)"
            )
    if not phrases:
        raise LabelConfigError(f"the labels of {control.name!r} give no phrase to detect")
    value = str(image.value or "")
    prompt = next(
        (c.name for c in interface.controls if type(c).__name__ == "TextAreaTag" and to_name in (c.to_name or [])),
        None,
    )
    return LabelTarget(
        from_name=control.name,
        to_name=to_name,
        value_key=value[1:] if value.startswith("$") else value,
        labels=labels,
        phrases=tuple(phrases),
        phrase_label=tuple(phrase_label),
        prompt_from_name=prompt,
    )


def typed_prompt(
    context: Mapping[str, Any] | None, target: LabelTarget, limits: LabelLimits | None = None
) -> list[str]:
    """The phrases an annotator typed into the config's prompt ``<TextArea>``, normalised.

    Label Studio sends them as ``params.context.result[*]`` with ``type: textarea`` and
    ``value.text: [...]``. Phrases are split on ``.``, ``,``, ``;`` and new lines. Parts of the context
    that are not shaped like that are ignored (the context is the client's). With ``limits``, too many
    or too long phrases are refused with a ``LabelConfigError`` naming the limit.
    """
    if not isinstance(context, Mapping) or target.prompt_from_name is None:
        return []
    items = context.get("result")
    phrases: dict[str, None] = {}  # ordered, and a set: a long prompt costs no quadratic search
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or item.get("from_name") != target.prompt_from_name:
            continue
        value = item.get("value")
        texts = value.get("text") if isinstance(value, Mapping) else None
        for text in [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []:
            if not isinstance(text, str):
                continue
            for part in _PROMPT_SPLIT.split(text):
                if part.strip():
                    phrases[normalize_phrase(part)] = None
    if limits is not None:
        _check_prompt(list(phrases), limits)
    return list(phrases)


def _check_labels(control: str, labels: Sequence[str], limits: LabelLimits) -> None:
    if len(labels) > limits.labels:
        raise LabelConfigError(
            f"<RectangleLabels name={control!r}> has {len(labels)} labels; at most {limits.labels} are served "
            "(DINOLABEL_MAX_LABELS)"
        )
    for label in labels:
        if len(label) > limits.phrase_length:
            raise LabelConfigError(
                f"label {_short(label)!r} has {len(label)} characters; at most {limits.phrase_length} are served "
                "(DINOLABEL_MAX_PHRASE_LENGTH)"
            )


def _check_prompt(phrases: Sequence[str], limits: LabelLimits) -> None:
    if len(phrases) > limits.prompt_phrases:
        raise LabelConfigError(
            f"the typed prompt has {len(phrases)} phrases; at most {limits.prompt_phrases} are served "
            "(DINOLABEL_MAX_PROMPT_PHRASES)"
        )
    for phrase in phrases:
        if len(phrase) > limits.phrase_length:
            raise LabelConfigError(
                f"the typed prompt has a phrase of {len(phrase)} characters; at most {limits.phrase_length} are "
                "served (DINOLABEL_MAX_PHRASE_LENGTH)"
            )


def _short(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[:most] + "..."


def match_label(phrase: str, target: LabelTarget) -> int | None:
    """The project label a typed phrase best matches, or None.

    In order: a label's own phrase equal to it; a label phrase contained in it as whole words
    ("red car" -> car), or containing it ("light" -> traffic light), longest first; otherwise the
    label phrase sharing most words.
    """
    words = _WORD.findall(phrase)
    best: tuple[int, int] | None = None  # (rank, label)
    for label_phrase, label in zip(target.phrases, target.phrase_label, strict=True):
        label_words = _WORD.findall(label_phrase)
        if label_phrase == phrase:
            return label
        if _contains(words, label_words) or _contains(label_words, words):
            rank = 1000 + len(label_words)
        else:
            rank = len(set(words) & set(label_words))
        if rank > 0 and (best is None or rank > best[0]):
            best = (rank, label)
    return None if best is None else best[1]


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    """Whether ``part`` occurs in ``words`` as a contiguous run of whole words."""
    n = len(part)
    return n > 0 and any(list(words[i : i + n]) == list(part) for i in range(len(words) - n + 1))
