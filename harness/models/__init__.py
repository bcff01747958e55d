"""Task models on a harness backbone, with one interface: ``model(images, targets)`` returns a
loss dict in training and predictions in eval (torchvision-style dicts for detection/pose,
logits at input size for segmentation). Each module also holds its task's training augmentation,
``fn(image, target, generator) -> (image, target)``, which the engine applies per sample.

detection.py (Faster R-CNN, FPN and C4), pose.py (Keypoint R-CNN), segmentation.py (DeepLabV3);
which one a card builds, with which settings, is its kind's (``harness.kinds``).
"""

GN_GROUPS = 32  # groups of head_norm gn: GroupNorm's default (Wu & He, ECCV 2018), as detectron2
