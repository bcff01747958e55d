"""Known backbones by name: `harness eval --backbone NAME` downloads the card's checkpoint into the
cache, verifies it, and loads it with the card's layout and normalization."""

from __future__ import annotations

from pathlib import Path

from harness.backbones import Backbone
from harness.cards import BackboneCard, backbone_card, is_card_name
from harness.checkpoints import load_backbone
from harness.errors import HarnessError
from harness.fetch import cache_dir, fetch, source_of


def fetch_backbone(card: BackboneCard, progress: bool = True, log=print) -> Path:
    """The card's checkpoint in ``$HARNESS_CACHE/backbones/<name>/``: downloaded once, verified against
    the published checksum (or prefix), its sha256 pinned on first download."""
    return fetch(card.file_name, card.urls, cache_dir() / "backbones" / card.name, checksum=card.checksum,
                 pin_key=f"backbone/{card.name}", progress=progress, log=log)


def load_eval_backbone(spec: str, arch: str | None = None, options: dict | None = None,
                       progress: bool = True) -> tuple[Backbone, dict]:
    """The backbone of ``--backbone`` (a file, random:<arch>, or a card name) and what the result
    records of it: ``{"name", "card", "url"}`` (card and url None unless it is a card)."""
    options = {k: v for k, v in (options or {}).items() if v not in (None, False)}
    if not is_card_name(spec):
        bb = load_backbone(spec, arch=arch, **options)
        name = spec if bb.checkpoint["path"] is None else Path(spec).name
        return bb, {"name": name, "card": None, "url": None}
    card = backbone_card(spec)
    if arch and arch != card.arch:
        raise HarnessError(f"backbone {card.name} is a {card.arch}; --arch {arch} contradicts its card")
    path = fetch_backbone(card, progress=progress)
    opts = {"key": card.key, "prefix": card.prefix, "normalization": card.normalization, **options}
    bb = load_backbone(path, arch=card.arch, **{k: v for k, v in opts.items() if v is not None})
    if bb.checkpoint["layout"] != card.layout:
        raise HarnessError(f"{path}: layout {bb.checkpoint['layout']!r} differs from the card's {card.layout!r} "
                           f"({card.name}); the file is not the one the card describes")
    source = source_of(path)
    url = source.read_text().strip() if source.is_file() else card.urls[0]
    return bb, {"name": card.name, "card": card.name, "url": url}
