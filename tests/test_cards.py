"""Task cards validate, hash stably, and bad cards fail with the file and the field."""

from __future__ import annotations

import pytest
import yaml

from harness.cards import all_cards, cards_dir, load_card
from harness.errors import HarnessError
from harness.results import mean_std


def test_every_card_has_the_three_profiles_and_both_protocols():
    cards = all_cards()
    assert {"coco", "voc", "seg", "pose"} <= set(cards)
    for card in cards.values():
        assert set(card.profiles) == {"full", "short", "smoke"}
        assert card.protocols == ["finetune", "frozen"]
        assert card.metric.primary in card.metric.columns
    assert cards["coco"].profile("full").iterations == 90000 and cards["voc"].profile("full").iterations == 24000
    assert cards["voc"].model.head == "c4" and cards["voc_fpn"].model.head == "fpn"


def test_hash_ignores_comments_and_order_but_not_content(tmp_path):
    data = yaml.safe_load((cards_dir() / "coco.yaml").read_text())
    reordered = dict(reversed(list(data.items())))
    (tmp_path / "a.yaml").write_text("# a comment\n" + yaml.safe_dump(reordered))
    assert load_card(tmp_path / "a.yaml").card_hash == load_card(cards_dir() / "coco.yaml").card_hash
    data["profiles"]["full"]["lr"] = 0.03
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    assert load_card(tmp_path / "b.yaml").card_hash != load_card(cards_dir() / "coco.yaml").card_hash


def test_bad_card_names_file_and_field(tmp_path):
    data = yaml.safe_load((cards_dir() / "voc.yaml").read_text())
    data["profiles"]["smoke"]["steps"] = [500]
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match=r"voc.yaml: profiles.smoke: .*steps \[500\] must increase and lie below iterations \d+"):
        load_card(tmp_path / "voc.yaml")
    data["model"]["head"] = "c5"
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match=r"voc.yaml: model.head"):
        load_card(tmp_path / "voc.yaml")


@pytest.mark.parametrize("card_name, change, message", [
    ("seg", {}, "head_norm gn needs an FPN head, not aspp"),
    ("voc", {}, "head_norm gn needs an FPN head, not c4"),
    ("coco", {"neck_channels": 48}, "head_norm gn needs neck_channels divisible by 32, got 48"),
    ("pose", {"keypoint_head_channels": 80}, "head_norm gn needs keypoint_head_channels divisible by 32, got 80"),
])
def test_head_norm_is_checked_when_the_card_loads(tmp_path, card_name, change, message):
    data = yaml.safe_load((cards_dir() / f"{card_name}.yaml").read_text())
    data["profiles"]["smoke"].update(head_norm="gn", **change)
    (tmp_path / f"{card_name}.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match=f"{card_name}.yaml: .*profile smoke: {message}"):
        load_card(tmp_path / f"{card_name}.yaml")


@pytest.mark.parametrize("card_name, change, message", [
    ("voc", {"neck_channels": 64}, r"the c4 head has no neck and its box head is res5: leave out neck_channels \(FPN"),
    ("voc", {"representation_size": 256}, r"the c4 head has no neck and its box head is res5: leave out "
                                           r"representation_size \(FPN settings\)"),
    ("coco", {"neck_channels": None}, r"neck_channels \(the FPN's width\) is required"),
    ("pose", {"neck_channels": None}, r"neck_channels \(the FPN's width\) is required"),
    ("seg", {"neck_channels": None}, r"neck_channels \(the ASPP's width\) is required"),
])
def test_no_card_holds_a_width_its_model_ignores(tmp_path, card_name, change, message):
    """The C4 model has no neck and its box head is res5: a card setting their widths is refused,
    and a model with a neck must have its width on the card."""
    data = yaml.safe_load((cards_dir() / f"{card_name}.yaml").read_text())
    for key, value in change.items():
        if value is None:
            del data["profiles"]["smoke"][key]
        else:
            data["profiles"]["smoke"][key] = value
    (tmp_path / f"{card_name}.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match=f"{card_name}.yaml: .*profile smoke: {message}"):
        load_card(tmp_path / f"{card_name}.yaml")


def test_mean_and_sample_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(1.2909944487358056)
