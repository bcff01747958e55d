"""An independent VOC AP reference, transcribed loop by loop from the devkit's VOCevaldet.m /
py-faster-rcnn's voc_eval (as detectron2 copies it). Deliberately plain and slow."""

from __future__ import annotations

import numpy as np


def devkit_ap(rec, prec, use_07_metric):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_eval(gt, dets, ovthresh, use_07_metric):
    """gt: {image: [(box x1y1x2y2 1-based, difficult)]} of ONE class; dets: [(image, score, box)]."""
    class_recs = {}
    npos = 0
    for image, objs in gt.items():
        bbox = np.array([o[0] for o in objs], dtype=float).reshape(-1, 4)
        difficult = np.array([o[1] for o in objs], dtype=bool)
        npos += int((~difficult).sum())
        class_recs[image] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(objs)}
    confidence = np.array([d[1] for d in dets])
    order = np.argsort(-confidence, kind="stable")
    nd = len(dets)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        image, _, bb = dets[order[d]]
        R = class_recs.get(image, {"bbox": np.zeros((0, 4)), "difficult": np.zeros(0, bool), "det": []})
        bb = np.asarray(bb, dtype=float)
        ovmax = -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_ap(rec, prec, use_07_metric)


def reference_voc(gt_by_class, dets_by_class, use_07_metric):
    """{'AP50', 'AP75', 'AP'} in percent over the classes with positives, detectron2's loop over thresholds."""
    aps = {t: [] for t in range(50, 100, 5)}
    for cls, gt in gt_by_class.items():
        if sum(not o[1] for objs in gt.values() for o in objs) == 0:
            continue
        for t in aps:
            aps[t].append(devkit_eval(gt, dets_by_class.get(cls, []), t / 100.0, use_07_metric))
    mean = {t: 100 * np.mean(v) for t, v in aps.items()}
    return {"AP": float(np.mean(list(mean.values()))), "AP50": float(mean[50]), "AP75": float(mean[75])}
