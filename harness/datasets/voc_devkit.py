"""What the PASCAL VOC devkit defines, without torch (`harness data synth` writes VOC folders with
it): the 20 class names in the devkit's order, the segmentation classes with background first, and
the colour map of its label PNGs."""

from __future__ import annotations

import numpy as np

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SEG_CLASSES = ("background",) + VOC_CLASSES


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (the devkit's labelcolormap.m): row i is the RGB of class i."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap
