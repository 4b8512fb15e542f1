"""Reading a Label Studio labeling config into what the detector needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.labeling import LabelConfigError, match_label, parse_label_config, typed_prompt

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "label_studio"  # recorded from Label Studio 1.23.2

CONFIG = """<View>
  <Image name="img" value="$photo"/>
  <TextArea name="prompt" toName="img" editable="true"/>
  <RectangleLabels name="boxes" toName="img">
    <Label value="Cat"/>
    <Label value="vehicle" predicted_values="car, truck"/>
    <Label value="Traffic  Light"/>
  </RectangleLabels>
</View>"""


def test_config_gives_names_labels_and_phrases() -> None:
    target = parse_label_config(CONFIG)
    assert (target.from_name, target.to_name, target.value_key) == ("boxes", "img", "photo")
    assert target.labels == ("Cat", "vehicle", "Traffic  Light")  # labels keep their exact spelling
    assert target.phrases == ("cat", "car", "truck", "traffic light")  # phrases are normalised
    assert target.phrase_label == (0, 1, 1, 2)
    assert target.prompt_from_name == "prompt"


def test_recorded_label_studio_config_parses() -> None:
    body = json.loads((SAMPLES / "ls_to_backend_predict_single.json").read_text())["body"]
    target = parse_label_config(body["label_config"])
    assert (target.from_name, target.to_name, target.value_key) == ("label", "image", "image")
    assert target.labels == ("cat", "dog")
    assert target.prompt_from_name is None


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        (
            '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
            "RectangleLabels",
        ),
        ("<View><Image", "cannot parse"),
    ],
)
def test_unusable_configs_say_why(xml: str, reason: str) -> None:
    with pytest.raises(LabelConfigError, match=reason):
        parse_label_config(xml)


def test_typed_prompt_is_read_from_the_textarea_and_split() -> None:
    target = parse_label_config(CONFIG)
    context = {
        "result": [
            {
                "from_name": "prompt",
                "to_name": "img",
                "type": "textarea",
                "value": {"text": ["Red car. dog", "kitten"]},
            },
            {"from_name": "other", "type": "textarea", "value": {"text": ["ignored"]}},
        ]
    }
    assert typed_prompt(context, target) == ["red car", "dog", "kitten"]
    assert typed_prompt(None, target) == []
    assert typed_prompt({"result": []}, target) == []


@pytest.mark.parametrize(
    ("phrase", "label"),
    [
        ("cat", 0),
        ("red car", 1),  # contains an alias of vehicle
        ("truck", 1),
        ("light", 2),  # contained in a label phrase
        ("traffic sign", 2),  # shares a word
        ("kitten", None),
    ],
)
def test_typed_phrase_maps_to_the_best_label(phrase: str, label: int | None) -> None:
    assert match_label(phrase, parse_label_config(CONFIG)) == label
