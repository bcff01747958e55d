"""Metrics: COCO boxes and keypoints (coco), VOC devkit AP (voc), mIoU (segmentation)."""

from __future__ import annotations

from numbers import Real


def real_types(types) -> bool:
    """Every type in ``types`` is a real number (int, float, numpy's): not a bool, a string or a list."""
    return all(t is not bool and issubclass(t, Real) for t in types)


def json_numbers(value, scalar: bool) -> bool:
    """``value`` is a number (``scalar``), or a list of numbers."""
    return real_types({type(value)}) if scalar else isinstance(value, list) and real_types(set(map(type, value)))


def member(value, ids) -> bool:
    """``value in ids``, False for an unhashable value (a list or an object read from JSON)."""
    try:
        return value in ids
    except TypeError:
        return False
