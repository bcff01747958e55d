"""The leaderboard's generated files: validated submissions and reported numbers -> Markdown, CSV, HTML.

One row per backbone, one column per (task, protocol, metric); results made under an older task card
are shown apart from the current ones. `harness leaderboard render` writes the files; `render --check`
tells whether the committed ones are fresh (``stale_files``)."""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from harness.cards import TaskCard, all_cards
from harness.errors import HarnessError, one_line
from harness.leaderboard import (MIN_SEEDS_FULL, ReportedEntry, Submission, TaskResult, load_reported, schema_json,
                                 submission_files, validate)
from harness.results import MetricStats


# ----------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Column:
    key: str
    title: str
    task: str
    protocol: str
    metric: str


COLUMNS = (
    Column("coco_finetune_AP", "COCO mAP@[.5,.95] fine-tune", "coco", "finetune", "AP"),
    Column("coco_frozen_AP", "COCO mAP@[.5,.95] frozen", "coco", "frozen", "AP"),
    Column("voc_finetune_AP50", "VOC AP50", "voc", "finetune", "AP50"),
    Column("voc_finetune_AP", "VOC AP", "voc", "finetune", "AP"),
    Column("seg_finetune_mIoU", "Seg mIoU fine-tune", "seg", "finetune", "mIoU"),
    Column("seg_frozen_mIoU", "Seg mIoU frozen", "seg", "frozen", "mIoU"),
    Column("pose_finetune_AP", "Pose AP", "pose", "finetune", "AP"),
)


@dataclass
class Row:
    name: str
    arch: str
    pretraining: str
    cells: dict[str, MetricStats | float]  # MetricStats (measured) or a published mean (reported)
    seeds: str = ""
    link: str | None = None
    cards: str = ""  # older card versions: task:hash prefix
    source: str = ""  # reported rows: the citation
    extra: dict = field(default_factory=dict)

    def sort_key(self):
        v = self.cells.get(COLUMNS[0].key)
        mean = v.mean if isinstance(v, MetricStats) else v
        return (mean is None, -(mean or 0.0), self.name.lower())


@dataclass
class Section:
    key: str
    title: str
    intro: str
    rows: list[Row]


def _images(n: int | None) -> str:
    if not n:
        return ""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _pretraining(data: str, images: int | None) -> str:
    return f"{data} ({_images(images)} images)" if images else data


def _seed_counts(counts: list[int]) -> str:
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def build_sections(subs: list[Submission], reported: list[ReportedEntry], cards: dict[str, TaskCard]) -> list[Section]:
    """Measured rows by (card current or older, profile); reported rows in their own section, never mixed."""
    buckets: dict[tuple[str, bool], list[Row]] = {}
    for sub in subs:
        b = sub.backbone
        groups: dict[tuple[str, bool], list[TaskResult]] = {}
        for r in sub.results:
            current = r.task in cards and r.card_hash == cards[r.task].card_hash
            groups.setdefault((r.profile, current), []).append(r)
        for key, rs in groups.items():
            cells, counts = {}, []
            for col in COLUMNS:
                for r in rs:
                    if (r.task, r.protocol) == (col.task, col.protocol) and col.metric in r.metrics:
                        cells[col.key] = r.metrics[col.metric]
                        counts.append(len(r.seeds))
            older = sorted({f"{r.task}:{r.card_hash[:8]}" for r in rs}) if not key[1] else []
            buckets.setdefault(key, []).append(Row(
                name=b.name, arch=b.arch, pretraining=_pretraining(b.pretraining_data, b.pretraining_images),
                cells=cells, seeds=_seed_counts(counts), link=sub.paper, cards=" ".join(older),
                extra={"pretraining_data": b.pretraining_data, "pretraining_images": b.pretraining_images or "",
                       "paper": sub.paper or "", "checkpoint_url": b.checkpoint_url or "",
                       "checkpoint_sha256": b.checkpoint_sha256 or ""}))
    sections = []
    titles = {
        ("full", True): ("measured", "Measured (full schedule)",
                         "The task cards' `full` profile (the literature's schedules), at least "
                         f"{MIN_SEEDS_FULL} seeds, mean ± sample std over seeds."),
        ("short", True): ("short", "Measured, short schedule",
                          "The `short` profile (about 1/8 of the full schedule): not comparable with the table above."),
        ("full", False): ("older-full", "Older card version (full schedule)",
                          "Made under task cards that have changed since: comparable only with runs of the same card hashes."),
        ("short", False): ("older-short", "Older card version (short schedule)",
                           "Made under task cards that have changed since, with the `short` profile."),
    }
    for key, (skey, title, intro) in titles.items():
        rows = sorted(buckets.get(key, []), key=Row.sort_key)
        if rows or skey == "measured":
            sections.append(Section(skey, title, intro, rows))
    rrows = []
    for e in reported:
        cells, trials = {}, []
        for col in COLUMNS:
            for r in e.results:
                if (r.task, r.protocol) == (col.task, col.protocol) and col.metric in r.metrics:
                    cells[col.key] = r.metrics[col.metric]
                    trials.append(r.trials or 1)
        rrows.append(Row(name=e.name, arch=e.arch, pretraining=_pretraining(e.pretraining_data, e.pretraining_images),
                         cells=cells, seeds=_seed_counts(trials), link=e.url, source=e.citation,
                         extra={"pretraining_data": e.pretraining_data, "pretraining_images": e.pretraining_images or "",
                                "paper": e.url, "checkpoint_url": "", "checkpoint_sha256": ""}))
    if rrows:
        sections.append(Section("reported", "Reported (published numbers, not measured by harness)",
                                "Copied from the cited source, which ran its own code (means only), in the order "
                                "of reported.yaml. They are not harness measurements and are never ranked with them.",
                                rrows))
    return sections


def _cell_text(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, MetricStats):
        return f"{v.mean:.1f} ± {v.std:.1f}" if len(v.values) > 1 else f"{v.mean:.1f}"
    return f"{v:.1f}"


def _headers(section: Section) -> list[str]:
    heads = ["Backbone", "Arch", "Pretraining data", *(c.title for c in COLUMNS), "Seeds"]
    if section.key.startswith("older"):
        heads.append("Card versions")
    if section.key == "reported":
        heads[-1] = "Trials"
        heads.append("Source")
    return heads


def _md(text: str) -> str:
    return one_line(text).replace("|", "\\|")


README_HEAD = """\
# Leaderboard

Transfer results of pretrained backbones, measured by `harness eval` under the task cards in `tasks/`.
This file, `leaderboard.csv`, `index.html` (sortable, works offline) and `schema.json` are written by
`harness leaderboard render` from `submissions/*.json` and `reported.yaml`: do not edit them by hand.

Columns: COCO is Faster R-CNN + FPN (`coco` card); VOC is Faster R-CNN C4 on VOC07+12 → VOC07 test
(`voc` card), fine-tune; Seg is DeepLabV3 on VOC2012 aug (`seg` card); Pose is Keypoint R-CNN
(`pose` card), fine-tune. Values are percent, mean ± sample std over seeds. Rows are sorted by COCO
mAP@[.5,.95] fine-tune.

## Submitting

    harness eval --backbone CKPT --data-root DATA --profile full --seeds 3 --out runs/NAME
    harness leaderboard submit --results runs/NAME/results.json --name "NAME" \\
        --pretraining-data ImageNet-1k --pretraining-images 1281167 [--paper URL] [--checkpoint-url URL]
    harness leaderboard validate && harness leaderboard render

and open a pull request with `submissions/<name>.json` and the re-rendered files. CI validates the
submission (schema, current card hashes, metrics in 0..100, at least 3 seeds for the `full` profile,
means and stds equal to those of the per-seed values, no synthetic or smoke results, a unique name)
and checks that the committed tables equal a fresh render. Validation never loads a checkpoint or runs
anything from a submission. Results made under an older card are listed under "older card version".
"""


def render_markdown(sections: list[Section]) -> str:
    out = [README_HEAD]
    for s in sections:
        out.append(f"\n## {s.title}\n\n{s.intro}\n")
        if not s.rows:
            out.append("\nNo entries yet.\n")
            continue
        heads = _headers(s)
        out.append("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads) + "\n")
        for r in s.rows:
            name = f"[{_md(r.name)}]({r.link})" if r.link else _md(r.name)
            if s.key == "reported":
                name += " (reported)"
            cells = [name, _md(r.arch), _md(r.pretraining), *(_cell_text(r.cells.get(c.key)) for c in COLUMNS), r.seeds]
            if s.key.startswith("older"):
                cells.append(r.cards)
            if s.key == "reported":
                cells.append(_md(r.source))
            out.append("| " + " | ".join(cells) + " |\n")
    return "".join(out)


def render_csv(sections: list[Section]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "name", "arch", "pretraining_data", "pretraining_images",
                *(f"{c.key}_{s}" for c in COLUMNS for s in ("mean", "std", "n")),
                "seeds", "card_versions", "paper", "checkpoint_url", "checkpoint_sha256", "source"])
    for s in sections:
        for r in s.rows:
            values = []
            for c in COLUMNS:
                v = r.cells.get(c.key)
                if isinstance(v, MetricStats):
                    values += [repr(v.mean), repr(v.std), len(v.values)]
                else:
                    values += ["" if v is None else repr(v), "", ""]
            w.writerow([s.key, r.name, r.arch, r.extra["pretraining_data"], r.extra["pretraining_images"], *values,
                        r.seeds, r.cards, r.extra["paper"], r.extra["checkpoint_url"], r.extra["checkpoint_sha256"],
                        r.source])
    return buf.getvalue()


HTML_STYLE = """\
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#1b1f24}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}p.intro{color:#57606a;margin:.2rem 0 .6rem}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #d0d7de;padding:.35rem .5rem;text-align:right;white-space:nowrap}
.t{text-align:left}td.t:last-child{white-space:normal;min-width:18rem}
th{background:#f6f8fa;cursor:pointer;user-select:none}th:focus{outline:2px solid #0969da}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:hover{background:#f6f8fa}table.reported td{font-style:italic;color:#57606a}span.tag{font-size:.75rem;border:1px solid #bf8700;color:#7d4e00;border-radius:.6rem;padding:0 .4rem;margin-left:.3rem;font-style:normal}
p.empty{color:#57606a;font-style:italic}div.scroll{overflow-x:auto}"""

HTML_SCRIPT = """\
(function () {
  function value(td, numeric) {
    var v = td.getAttribute("data-v");
    if (numeric) { return v === "" ? null : parseFloat(v); }
    return v.toLowerCase();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      function sort() {
        var numeric = th.getAttribute("data-type") === "num";
        var now = th.getAttribute("aria-sort");
        var dir = now === "descending" ? "ascending" : now === "ascending" ? "descending" : (numeric ? "descending" : "ascending");
        var sign = dir === "ascending" ? 1 : -1;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a.cells[col], numeric), y = value(b.cells[col], numeric);
          if (x === null || y === null) { return (x === null) - (y === null); }
          return x < y ? -sign : x > y ? sign : 0;
        });
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.tabIndex = 0;
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def render_html(sections: list[Section]) -> str:
    out = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
           'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">\n',
           '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
           f"<title>harness leaderboard</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n<body>\n",
           "<h1>harness leaderboard</h1>\n<p class=\"intro\">Transfer results of pretrained backbones under the "
           "task cards. Values are percent, mean ± sample std over seeds. Click a column header to sort.</p>\n"]
    for s in sections:
        out.append(f'<section id="{s.key}">\n<h2>{_e(s.title)}</h2>\n<p class="intro">{_e(s.intro.replace("`", ""))}</p>\n')
        if not s.rows:
            out.append('<p class="empty">No entries yet.</p>\n</section>\n')
            continue
        heads = _headers(s)
        numeric = {c.title for c in COLUMNS} | {"Seeds", "Trials"}
        cls = "board reported" if s.key == "reported" else "board"
        out.append(f'<div class="scroll"><table class="{cls}">\n<thead><tr>')
        for h in heads:
            sort = ' aria-sort="descending"' if h == COLUMNS[0].title and s.key != "reported" else ""
            kind, cls = ("num", "") if h in numeric else ("text", ' class="t"')
            out.append(f'<th data-type="{kind}"{cls}{sort}>{_e(h)}</th>')
        out.append("</tr></thead>\n<tbody>\n")
        for r in s.rows:
            name = f'<a href="{_e(r.link)}" rel="noopener">{_e(r.name)}</a>' if r.link else _e(r.name)
            if s.key == "reported":
                name += '<span class="tag">reported</span>'
            cells = [f'<td class="t" data-v="{_e(r.name)}">{name}</td>',
                     f'<td class="t" data-v="{_e(r.arch)}">{_e(r.arch)}</td>',
                     f'<td class="t" data-v="{_e(r.pretraining)}">{_e(r.pretraining)}</td>']
            for c in COLUMNS:
                v = r.cells.get(c.key)
                mean = "" if v is None else repr(v.mean if isinstance(v, MetricStats) else v)
                cells.append(f'<td data-v="{mean}">{_e(_cell_text(v))}</td>')
            cells.append(f'<td data-v="{_e(r.seeds.split("–")[0])}">{_e(r.seeds)}</td>')
            if s.key.startswith("older"):
                cells.append(f'<td class="t" data-v="{_e(r.cards)}">{_e(r.cards)}</td>')
            if s.key == "reported":
                cells.append(f'<td class="t" data-v="{_e(r.source)}">{_e(r.source)}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>\n")
        out.append("</tbody>\n</table></div>\n</section>\n")
    out.append(f"<script>\n{HTML_SCRIPT}\n</script>\n</body>\n</html>\n")
    return "".join(out)


def render(board: Path, cards: dict[str, TaskCard] | None = None) -> dict[str, str]:
    """The generated files' contents, by name; refuses when a submission does not validate."""
    cards = all_cards() if cards is None else cards
    errors, _, subs = validate(submission_files(board), board, cards)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HarnessError(f"cannot render: {errors[0]}{more}; run harness leaderboard validate")
    sections = build_sections(list(subs.values()), load_reported(board, cards), cards)
    return {"README.md": render_markdown(sections), "leaderboard.csv": render_csv(sections),
            "index.html": render_html(sections), "schema.json": schema_json()}


def write_render(board: Path, cards=None) -> list[Path]:
    paths = []
    for name, text in render(board, cards).items():
        (board / name).write_text(text)
        paths.append(board / name)
    return paths


def stale_files(board: Path, cards=None) -> list[Path]:
    """Generated files whose committed content differs from a fresh render."""
    return [board / n for n, text in render(board, cards).items()
            if not (board / n).is_file() or (board / n).read_text() != text]
