"""Load a backbone from any checkpoint: read it, recognise its layout, build, account, fill.

``match_checkpoint`` does everything but the filling, on the meta device (shapes only);
``load_backbone`` fills a real backbone and raises unless every tensor is accounted for;
``inspect_checkpoint`` reports the match as ``harness inspect`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.backbones import Backbone, arch_family, build_backbone, canonical_arch
from harness.checkpoints.formats import HARNESS_FORMAT, Layout, Probe, arch_named_by, detect, harness_metadata, \
    tensor_options
from harness.checkpoints.match import Target, account, choose_prefix, reason
from harness.checkpoints.report import Match, Reading, Source, random_report
from harness.checkpoints.read import StateDict, count_tensors, read_checkpoint, select_state_dict, strip_wrappers, \
    unwrap
from harness.errors import HarnessError
from harness.files import sha256_file
from harness.normalization import IMAGENET, Normalization, resolve_normalization

RANDOM_INIT_SEED = 0  # random:<arch> is the architecture's initialisation drawn with this torch seed
_OPTION_ORDER = ("stride_in_1x1", "img_size", "reg_tokens", "num_heads")  # as reports list them (others after)
_DEFAULT_NORM = "default: ImageNet RGB mean/std (torchvision/timm convention); override with --normalization"


@dataclass(frozen=True)
class LoadOptions:
    """What a user may decide about a load (CLI ``inspect``/``export``/``eval`` flags)."""

    key: str | None = None  # the entry holding the weights ("a/b" when nested)
    prefix: str | None = None  # the encoder's key prefix
    normalization: object = None  # preset name, dict, JSON or Normalization
    allow_missing: bool = False  # deliberate partial loads
    allow_unexpected: bool = False
    unsafe_load: bool = False  # DANGEROUS: full pickle load, may run code from the file
    img_size: int | None = None  # ViTs: the grid position embeddings are resampled to
    num_heads: int | None = None  # ViTs
    stride_in_1x1: bool | None = None  # ResNets


# ----------------------------------------------------------------------------- the match
def match_checkpoint(path, arch: str | None = None, **opts) -> Match:
    """Read ``path``, recognise its layout, build ``arch`` on the meta device and account for every tensor.

    ``opts`` are :class:`LoadOptions` fields. Raises :class:`HarnessError` for unreadable/unsafe
    files and unknown architectures; an incomplete match is returned with ``ok == False``.
    """
    o = LoadOptions(**opts)
    path = Path(path)
    obj, container, st_meta = read_checkpoint(path, unsafe_load=o.unsafe_load)
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (only reachable with --unsafe-load)
        obj = obj.state_dict()
    source, state = _open(path, obj, container, st_meta, o.key)
    sd = unwrap(state, path)
    named, named_source = arch_named_by(obj, st_meta)
    if not arch and not named:
        raise HarnessError(f"{path}: the checkpoint does not name its architecture ({source.tensors_in_file} tensors, "
                           f"entry {source.entry or '(top level)'}); pass --arch, e.g. --arch resnet50")
    arch, arch_source = (canonical_arch(arch), "user") if arch else (named, named_source)
    top = obj if isinstance(obj, dict) else {}
    probe, bb = _probe(source, top, sd, arch, harness_metadata(obj, st_meta), st_meta, o)
    layout = detect(probe)
    options, notes = _options(probe, layout, o)
    if options != bb.options:
        with torch.device("meta"):
            bb = build_backbone(arch, **options)
    target = Target(bb.checkpoint_shapes(), frozenset(k for k in bb.state_dict() if bb.is_new(k)),
                    tuple(bb.head_prefixes), layout.folded_bn, bb.resize_checkpoint_tensor)
    prefix = probe.prefix if o.prefix is not None else choose_prefix(sd.tensors, target, layout.rename, path, arch)
    acc = account(sd, target, prefix, layout.rename)
    acc.ignored[:0] = source.other_entries
    norm, norm_source = _normalization(probe, layout, o)
    bb.set_normalization(norm)
    naming = _naming(layout, sd, prefix, probe.family)
    reading = Reading(layout.label(probe), _detail(source, sd, prefix, naming, probe.author), naming, prefix,
                      list(sd.stripped), arch, arch_source, named, options, norm, norm_source, notes, layout.folded_bn)
    return Match(source, reading, acc, bb, o.allow_missing, o.allow_unexpected)


def _open(path: Path, obj, container: str, st_meta: dict, key: str | None) -> tuple[Source, dict]:
    """The file's facts and its state dict (the entry ``key``, else the known wrappers unwrapped)."""
    fmt = st_meta.get("harness_format")
    if fmt is not None and fmt != HARNESS_FORMAT:
        raise HarnessError(f"{path}: harness format {fmt!r} is newer than this harness ({HARNESS_FORMAT})")
    source = Source(str(path), sha256_file(path), path.stat().st_size, container, tensors_in_file=count_tensors(obj))
    state, entry_path, others = select_state_dict(obj, key)
    source.entry = "/".join(entry_path)
    top = obj if isinstance(obj, dict) else {}
    source.metadata_keys = sorted(str(k) for k, v in top.items() if count_tensors(v) == 0 and k not in entry_path[:1])
    for name, value in others:
        n = count_tensors(value)
        if n:
            source.other_entries.append({"prefix": f"[{name}]", "tensors": n, "reason": reason(name),
                                         "where": "checkpoint entry"})
    return source, state


def _probe(source: Source, top: dict, sd: StateDict, arch: str, harness: dict, st_meta: dict,
           o: LoadOptions) -> tuple[Probe, Backbone]:
    """What detection sees, and the architecture built with the options known before it (meta device)."""
    family = arch_family(arch)
    options = {**harness.get("options", {}), **_user_options(family, o)}
    if not options.get("stride_in_1x1"):
        options.pop("stride_in_1x1", None)
    with torch.device("meta"):
        bb = build_backbone(arch, **options)
    if o.prefix is not None:
        prefix = strip_wrappers(o.prefix.rstrip(".")) + "." if o.prefix.strip(".") else ""
        if prefix and not any(k.startswith(prefix) for k in sd.tensors):
            raise HarnessError(f"{source.path}: no key starts with prefix {o.prefix!r}")
    else:
        try:  # where the architecture's own names are; a renaming layout is recognised by its names instead
            prefix = choose_prefix(sd.tensors, Target(bb.checkpoint_shapes()), lambda k: k, source.path, arch)
        except HarnessError:
            prefix = None
    probe = Probe(source.container, top, source.entry, tuple(sd.tensors), tuple(sd.stripped), arch, family,
                  prefix, harness, st_meta.get("harness_format"))
    return probe, bb


def _user_options(family: str, o: LoadOptions) -> dict:
    if family == "resnet":
        return {} if o.stride_in_1x1 is None else {"stride_in_1x1": bool(o.stride_in_1x1)}
    if family == "vit":
        return {k: int(getattr(o, k)) for k in ("img_size", "num_heads") if getattr(o, k)}
    return {}


def _options(probe: Probe, layout: Layout, o: LoadOptions) -> tuple[dict, list[str]]:
    """Build options: the user's, else what the weights need (layout, tensors), else the harness metadata's."""
    options = dict(probe.harness.get("options", {}))
    user = _user_options(probe.family, o)
    decided = {**tensor_options(probe), **layout.options(probe)}
    notes = []
    for k in sorted({**decided, **user}, key=lambda k: (_OPTION_ORDER + (k,)).index(k)):
        if k in user:
            options[k] = user[k]
        elif k in decided:
            options[k] = decided[k][0]
            notes.append(decided[k][1])
    if not options.get("stride_in_1x1"):
        options.pop("stride_in_1x1", None)
    return options, notes


def _normalization(probe: Probe, layout: Layout, o: LoadOptions) -> tuple[Normalization, str]:
    user = resolve_normalization(o.normalization)
    if user is not None:
        return user, "user"
    if probe.harness.get("normalization"):
        return Normalization.from_dict(probe.harness["normalization"]), "checkpoint metadata"
    return layout.normalization(probe) or (IMAGENET, _DEFAULT_NORM)


def _naming(layout: Layout, sd: StateDict, prefix: str, family: str) -> str:
    """The layout's key-name scheme when its renamer changes names, else the architecture's own."""
    n = len(prefix)
    if layout.naming and any(layout.rename(k[n:]) != k[n:] for k in sd.tensors if k.startswith(prefix)):
        return layout.naming
    return "torchvision" if family == "resnet" else "timm"


def _detail(source: Source, sd: StateDict, prefix: str, naming: str, author: str) -> str:
    """The layout in one sentence: container, entry, wrappers removed, prefix, key names, author."""
    detail = [f"{source.container} file"]
    if source.entry:
        detail.append(f"weights in entry {source.entry!r}")
    if sd.stripped:
        detail.append("removed " + ", ".join(repr(s) for s in sd.stripped))
    detail.append(f"encoder prefix {prefix!r}" if prefix else "no encoder prefix")
    detail.append(f"{naming} key names")
    if author:
        detail.append(f"__author__ {author!r}")
    return "; ".join(detail)


# ----------------------------------------------------------------------------- public API
def load_backbone(path_or_spec, arch: str | None = None, **opts) -> Backbone:
    """Backbone from a checkpoint file (any layout ``harness inspect`` knows) or ``random:<arch>``.

    Options (:class:`LoadOptions`): ``normalization`` (override), ``allow_missing`` /
    ``allow_unexpected`` (deliberate partial loads), ``key`` (top-level entry to read, e.g.
    ``student``), ``prefix`` (encoder prefix), ``unsafe_load`` (DANGEROUS: full pickle, may run
    code from the file), and the build options ``img_size``, ``num_heads`` (ViTs) and
    ``stride_in_1x1`` (ResNets) when the file does not decide them. Raises :class:`HarnessError`
    unless every tensor is accounted for. The result carries ``checkpoint`` (path, sha256,
    layout) and ``load_report`` (as ``inspect``).
    """
    spec = str(path_or_spec)
    if spec.startswith("random:"):
        return _random(spec, arch, opts)
    m = match_checkpoint(spec, arch, **opts)
    if not m.ok:
        raise HarnessError(m.summary())
    bb = _materialize(m)
    state = bb.state_dict()
    _fill(state, bb, m)
    if m.accounting.load_new:
        m.reading.notes.append(f"new layers loaded from the file: {len(m.accounting.load_new)} tensors "
                               f"({', '.join(bb.new_prefixes)})")
    bb.load_state_dict(state, strict=True)
    bb.checkpoint = {"path": m.source.path, "sha256": m.source.sha256, "layout": m.reading.layout}
    m.backbone = bb
    bb.load_report = m.report()
    bb.eval()
    return bb


def _random(spec: str, arch: str | None, opts: dict) -> Backbone:
    """``random:<arch>``: the architecture's initialisation drawn with a fixed seed (the same on every rank)."""
    name = spec[len("random:"):] or arch
    if not name:
        raise HarnessError("random: needs an architecture, e.g. random:resnet50")
    if arch and canonical_arch(arch) != canonical_arch(name):
        raise HarnessError(f"spec {spec!r} names {name} but arch={arch!r} was asked")
    build_opts = {k: opts[k] for k in ("img_size", "stride_in_1x1", "reg_tokens", "num_heads") if opts.get(k)}
    with torch.random.fork_rng(devices=[]):  # the same weights on every rank and every rerun
        torch.manual_seed(RANDOM_INIT_SEED)
        bb = build_backbone(name, normalization=opts.get("normalization"), **build_opts)
    bb.checkpoint = {"path": None, "sha256": None, "layout": "random"}
    return bb


def _materialize(m: Match) -> Backbone:
    """A real backbone for the match: random init only where something keeps its initial value."""
    bb = m.backbone
    state_keys = set(bb.state_dict())
    extra_buffers = {n for n, _ in bb.named_buffers() if n not in state_keys} - {"pixel_mean", "pixel_std"}
    if m.accounting.missing or extra_buffers:  # something keeps its initial value: a real random initialisation
        return build_backbone(m.reading.arch, normalization=m.reading.normalization, **m.reading.options)
    bb.to_empty(device="cpu")  # every persistent tensor comes from the file: skip the init, except new layers
    for name, module in bb.named_modules():
        if name and bb.is_new(name + ".") and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    bb.set_normalization(m.reading.normalization)
    return bb


def _fill(state: dict, bb: Backbone, m: Match) -> None:
    """Put the file's tensors into ``state``; BatchNorm counters at 0, folded running stats at (0, 1-eps)."""
    prefix = bb.trunk_prefix
    acc = m.accounting
    for k, t in acc.load.items():
        state[prefix + k] = t.to(dtype=state[prefix + k].dtype)
    for k, t in acc.load_new.items():
        if tuple(t.shape) == tuple(state[k].shape):
            state[k] = t.to(dtype=state[k].dtype)
    for name, module in bb.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            key = (name + "." if name else "")
            rel = key[len(prefix):]
            if rel + "num_batches_tracked" not in acc.load:
                state[key + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
            if m.reading.folded_bn and rel + "running_var" not in acc.load:
                state[key + "running_mean"] = torch.zeros(module.num_features)
                state[key + "running_var"] = torch.full((module.num_features,), 1.0 - module.eps)


def inspect_checkpoint(path, arch: str | None = None, **opts) -> dict:
    """The JSON-able account of a checkpoint against ``arch`` (``ok`` False when incomplete)."""
    spec = str(path)
    if spec.startswith("random:"):
        with torch.device("meta"):
            bb = _random(spec, arch, {"normalization": opts.get("normalization")})
        return random_report(spec, bb, user_norm=bool(opts.get("normalization")))
    return match_checkpoint(path, arch, **opts).report()

