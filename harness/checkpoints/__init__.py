"""Checkpoints: read any file safely, recognise its layout, account for every tensor, export.

    read.py     the file -> its state dict, never running code from it (weights_only, safetensors,
                a restricted unpickler for detectron2/caffe2 .pkl)
    formats.py  the known layouts, one record each, tried in order (detection, key renaming,
                build options, normalization)
    match.py    the accounting: loaded, missing, unexpected, mismatched, ignored (and why)
    load.py     read -> recognise -> build -> account -> fill: ``load_backbone``, ``inspect_checkpoint``
    report.py   the report `harness inspect` prints
    export.py   the harness's own format (``save_backbone``) and other frameworks' (``export_backbone``)

Imports flow one way: cli -> checkpoints -> backbones (which builds architectures and knows no file).
"""

from harness.checkpoints.export import EXPORT_TARGETS, export_backbone, save_backbone
from harness.checkpoints.formats import LAYOUTS, Layout, d2_to_tv, tv_to_d2
from harness.checkpoints.load import RANDOM_INIT_SEED, LoadOptions, inspect_checkpoint, load_backbone, \
    match_checkpoint
from harness.checkpoints.read import read_checkpoint
from harness.files import sha256_file
from harness.checkpoints.report import format_inspection

__all__ = ["EXPORT_TARGETS", "LAYOUTS", "Layout", "LoadOptions", "RANDOM_INIT_SEED", "d2_to_tv", "export_backbone",
           "format_inspection", "inspect_checkpoint", "load_backbone", "match_checkpoint", "read_checkpoint",
           "save_backbone", "sha256_file", "tv_to_d2"]
