"""Task kinds: one module per kind of task a card can name (``model.kind``).

``KINDS[card.model.kind]`` is all the runner, ``harness score`` and the card checks know of a
kind. Every kind module defines:

    LAYOUTS, HEADS           the card's ``dataset.layout`` and ``model.head`` values it accepts
    MIN_IMAGES_PER_PROCESS   images per process and micro-batch training needs without SyncBatchNorm
                             (with MIN_IMAGES_REASON when above 1)
    OWN_FIELDS               profile fields only this kind reads (cards of other kinds may not set them)
    check_card(card)         card rules beyond the schema; raises ValueError
    datasets(card, root)     (train, test, train split name, test split name) under a data root
    train_groups(card, profile, train)  aspect-ratio groups of the training images, or None
    settings(card, profile)  (build_model keywords, train_augment keywords), named as the card fields
    build_model(backbone, **kw), train_augment(backbone, **kw)
    postprocess(card, test)  fn(output, target) -> the small picklable record of one test image
    score_records(card, test, records)  metrics (percent) of the gathered records
    score_files(card, gt, pred, split, year)  metrics of predictions on disk (``harness score``)

Kind modules import torch-dependent code inside the functions that use it, so that reading cards
stays free of torch (the leaderboard validates submissions without it).
"""

from __future__ import annotations

from harness.kinds import detection, keypoints, segmentation

KINDS = {"detection": detection, "keypoints": keypoints, "segmentation": segmentation}
