"""What is known of a checkpoint (the file, how it is read, the accounting) and how `harness inspect` shows it."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.backbones import Backbone
from harness.normalization import Normalization
from harness.checkpoints.match import Accounting


@dataclass
class Source:
    """The file: what it is and what in it is not the weights."""

    path: str
    sha256: str
    size_bytes: int
    container: str
    entry: str = ""  # the entry holding the weights
    tensors_in_file: int = 0
    metadata_keys: list = field(default_factory=list)  # top-level entries without tensors
    other_entries: list = field(default_factory=list)  # ignored entries holding tensors (student, optimizer, ...)


@dataclass
class Reading:
    """How the harness reads the file: layout, architecture and options, prefix, normalization."""

    layout: str
    detail: str
    naming: str
    prefix: str
    stripped: list
    arch: str
    arch_source: str
    arch_named: str | None  # the architecture the file names (when it names one)
    options: dict
    normalization: Normalization
    normalization_source: str
    notes: list
    folded_bn: bool = False


@dataclass
class Match:
    """One checkpoint against one architecture: the file, how it is read, the accounting."""

    source: Source
    reading: Reading
    accounting: Accounting
    backbone: Backbone  # built on the meta device
    allow_missing: bool = False  # deliberate partial loads (the user's)
    allow_unexpected: bool = False

    @property
    def ok(self) -> bool:
        return self.accounting.ok(self.allow_missing, self.allow_unexpected)

    def summary(self) -> str:
        return summary(self)

    def report(self) -> dict:
        return report(self)



def summary(m: Match) -> str:
    """One line: what matched, or why the load fails."""
    acc, r = m.accounting, m.reading
    where = f"{m.source.path}: {r.layout or 'checkpoint'}"
    if m.ok:
        extra = []
        if acc.missing:
            extra.append(f"{len(acc.missing)} missing left random (--allow-missing)")
        if acc.unexpected:
            extra.append(f"{len(acc.unexpected)} unexpected not loaded (--allow-unexpected)")
        tail = f" ({'; '.join(extra)})" if extra else ""
        return f"{where} -> {r.arch}: all {len(acc.load)} tensors loaded{tail}"
    bits = []
    if acc.missing:
        bits.append(f"{len(acc.missing)} missing ({_examples(acc.missing)})")
    if acc.unexpected:
        bits.append(f"{len(acc.unexpected)} unexpected ({_examples(acc.unexpected)})")
    if acc.mismatched:
        x = acc.mismatched[0]
        bits.append(f"{len(acc.mismatched)} shape mismatches (e.g. {x['key']}: "
                    f"checkpoint {x['checkpoint']} vs model {x['model']})")
    if acc.non_finite:
        bits.append(f"{len(acc.non_finite)} tensors with NaN/Inf ({_examples(acc.non_finite)})")
    named = f" (the checkpoint names {r.arch_named})" if r.arch_named and r.arch_named != r.arch else ""
    return (f"{where} does not match {r.arch}{named}: {len(acc.load)} tensors matched; " + "; ".join(bits)
            + " - see `harness inspect --json` for the full lists")


def report(m: Match) -> dict:
    """The JSON-able report of a match (what `harness inspect --json` prints and results keep)."""
    s, r, acc, bb = m.source, m.reading, m.accounting, m.backbone
    return {
        "path": s.path, "sha256": s.sha256, "size_bytes": s.size_bytes, "container": s.container,
        "layout": r.layout, "layout_detail": r.detail, "entry": s.entry, "prefix": r.prefix, "naming": r.naming,
        "stripped_prefixes": list(r.stripped), "arch": r.arch, "arch_source": r.arch_source,
        "options": dict(r.options), "ok": m.ok, "summary": summary(m),
        "tensors_in_file": s.tensors_in_file, "tensors_loaded": len(acc.load),
        "missing": list(acc.missing), "unexpected": list(acc.unexpected),
        "shape_mismatches": list(acc.mismatched), "non_finite": list(acc.non_finite),
        "ignored_prefixes": list(acc.ignored), "defaulted": list(acc.defaulted),
        "interpolated": list(acc.interpolated), **_architecture(bb),
        "normalization": dict(r.normalization.to_dict(), source=r.normalization_source),
        "metadata_keys": list(s.metadata_keys), "notes": list(r.notes),
    }


def _architecture(bb: Backbone) -> dict:
    return {
        "new_layers": {"prefixes": list(bb.new_prefixes),
                       "parameters": sum(p.numel() for n, p in bb.named_parameters() if bb.is_new(n))},
        "parameters": bb.num_parameters,
        "feature_info": [vars(f).copy() for f in bb.feature_info],
    }


def random_report(spec: str, bb: Backbone, user_norm: bool) -> dict:
    """The report of ``random:<arch>``: no file, nothing to account for."""
    d = bb.describe()
    n = len(bb.checkpoint_shapes())
    return {"path": spec, "sha256": None, "size_bytes": None, "container": None, "layout": "random",
            "layout_detail": "randomly initialised, no file", "entry": "", "prefix": "", "naming": None,
            "stripped_prefixes": [], "arch": bb.arch, "arch_source": "spec", "options": d["options"], "ok": True,
            "summary": f"{spec}: random initialisation of {bb.arch} ({n} tensors)", "tensors_in_file": 0,
            "tensors_loaded": 0, "missing": [], "unexpected": [], "shape_mismatches": [], "non_finite": [],
            "ignored_prefixes": [], "defaulted": [], "interpolated": [],
            "new_layers": {"prefixes": list(bb.new_prefixes), "parameters": d["new_parameters"]},
            "parameters": d["parameters"], "feature_info": d["feature_info"],
            "normalization": dict(d["normalization"], source="user" if user_norm else "default"),
            "metadata_keys": [], "notes": []}


def format_inspection(report: dict) -> str:
    """Human-readable text of an ``inspect_checkpoint`` report."""
    lines = [
        f"path:          {report['path']}",
        f"sha256:        {report['sha256']}",
        f"layout:        {report['layout']}  ({report['layout_detail']})",
        f"arch:          {report['arch']}  (from {report['arch_source']})"
        + (f"  options {report['options']}" if report.get("options") else ""),
        f"tensors:       {report['tensors_loaded']} loaded of {report['tensors_in_file']} in the file",
        f"parameters:    {report['parameters']:,}" if report.get("parameters") is not None else "parameters:    ?",
    ]
    new = report.get("new_layers") or {}
    if new.get("parameters"):
        lines.append(f"new layers:    {', '.join(new['prefixes'])} ({new['parameters']:,} parameters, "
                     "randomly initialised)")
    norm = report.get("normalization")
    if norm:
        lines.append(f"normalization: {norm['channel_order']} mean {norm['mean']} std {norm['std']}  "
                     f"({norm.get('source', '')})")
    if report.get("feature_info"):
        feats = ", ".join(f"{f['name']} {f['channels']}ch /{f['stride']}" for f in report["feature_info"])
        lines.append(f"features:      {feats}")
    lines += _lists(report)
    lines.append(("OK: " if report.get("ok") else "FAIL: ") + report.get("summary", ""))
    return "\n".join(lines)


def _lists(report: dict) -> list[str]:
    lines = [f"ignored:       {i['prefix']} ({i['tensors']} tensors: {i['reason']})"
             for i in report.get("ignored_prefixes", [])]
    lines += [f"defaulted:     {i['keys']} x{i['count']}: {i['value']}" for i in report.get("defaulted", [])]
    lines += [f"note:          {note}" for note in report.get("notes", [])]
    lines += [f"interpolated:  {i['key']} {i['from']} -> {i['to']}" for i in report.get("interpolated", [])]
    for label, key in (("missing", "missing"), ("unexpected", "unexpected"), ("non-finite", "non_finite")):
        if report.get(key):
            lines.append(f"{label + ':':<15}{len(report[key])}: {_examples(report[key], 8)}")
    lines += [f"shape:         {i['key']} checkpoint {i['checkpoint']} vs model {i['model']}"
              for i in report.get("shape_mismatches", [])[:8]]
    return lines


def _examples(keys, n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")
