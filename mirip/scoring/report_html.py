"""A self-contained HTML page of scored drawings, so a teacher can look rather than read.

Thumbnails are embedded as base64 JPEG (the page is one file that opens
anywhere, offline). The page holds one list of every drawing ordered by score;
every card shows the overall rank and the score (and, from a calibrated
checkpoint, the predicted tier, its probability and the percentile).

When tiers are known it adds what the person training the model needs: the
**disagreements** (drawings whose score contradicts their tier most, with both
numbers), the confusion matrix and the per-tier score distributions. Each of
those says which drawings it was computed on: the held-out (test) drawings when
the run's split is known, else all drawings with a tier, labelled as possibly
including training images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections import defaultdict
from datetime import datetime, timezone
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from mirip.common.tiers import TIERS, TIER_COLOURS, TIER_RANK
from mirip.ml.preprocessing import load_image
from mirip.training.bootstrap import percentile_interval, resample_counts
from mirip.training.calibration import OrdinalCalibration
from mirip.training.calibration_metrics import confusion_matrix

NO_TIER = "no tier"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem;color:#222;background:#fafaf7}
h1{font-size:1.4rem;margin:0 0 .5rem} h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #ccc}
.meta{font-size:.85rem;color:#555} .meta td{padding:0 .8rem 0 0}
.note{background:#fff3cd;border:1px solid #e0c060;padding:.5rem .8rem;margin:.6rem 0;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}
.card{width:%(w)dpx;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.8rem}
.card img{width:%(w)dpx;height:%(w)dpx;object-fit:contain;background:#eee;display:block}
.rank{font-weight:700} .score{float:right;font-variant-numeric:tabular-nums}
.name{color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;margin-top:2px}
.tier{display:inline-block;padding:0 .35rem;border-radius:3px;background:#333;color:#fff;margin-left:.3rem}
.missing{width:%(w)dpx;height:%(w)dpx;display:flex;align-items:center;justify-content:center;background:#eee;color:#a00}
table.failed td{padding:0 1rem 0 0;font-size:.85rem}
.pred{color:#333} .pct{float:right;color:#555} .split{color:#777;font-size:.75rem}
.card.wrong{border:2px solid #c0392b} .why{color:#a00;font-weight:600}
table.confusion{border-collapse:collapse;margin:.4rem 0} table.confusion td,table.confusion th{border:1px solid #bbb;
padding:.2rem .6rem;text-align:right} table.confusion .diag{background:#e3f1e0;font-weight:700}
.unusual{display:inline-block;padding:0 .35rem;border-radius:3px;background:#c77c00;color:#fff;font-weight:600}
.basis{font-size:.85rem;color:#555;margin:.2rem 0 .6rem}
nav.toc{position:sticky;top:0;z-index:5;background:#fafaf7;border-bottom:1px solid #ccc;padding:.35rem 0;
font-size:.9rem} nav.toc a{margin-right:1.1rem;white-space:nowrap} h2{scroll-margin-top:2.6rem}
"""
MAX_DISAGREEMENTS = 30


def thumbnail_data_uri(path: str, size: int = 192, quality: int = 82) -> str:
    """The image (upright, RGB) shrunk to fit ``size`` x ``size``, as a ``data:image/jpeg;base64`` URI."""
    img = load_image(path, draft_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def tier_agreement(scores: Sequence[float], tiers: Sequence[Optional[str]]) -> Tuple[float, int]:
    """Fraction of cross-tier pairs whose better-tier drawing scores higher (ties count half), and the pair count.

    Counted per pair of tiers with a sort and ``searchsorted``: O(N log N), no pair list.
    """
    by_tier: Dict[str, np.ndarray] = {}
    for t in TIERS:
        vals = [s for s, tt in zip(scores, tiers) if tt == t]
        if vals:
            by_tier[t] = np.sort(np.asarray(vals, dtype=np.float64))
    wins, pairs = 0.0, 0
    names = [t for t in TIERS if t in by_tier]  # best tier first
    for i, hi in enumerate(names):
        for lo in names[i + 1:]:
            low = by_tier[lo]
            below = np.searchsorted(low, by_tier[hi], side="left")
            ties = np.searchsorted(low, by_tier[hi], side="right") - below
            wins += float(below.sum() + 0.5 * ties.sum())
            pairs += len(by_tier[hi]) * len(low)
    return (wins / pairs if pairs else float("nan")), pairs


def _known(value) -> bool:
    return value is not None and value == value and value != ""  # not None, NaN or empty


def _tier(entry: Mapping) -> Optional[str]:
    t = entry.get("tier")
    return str(t) if _known(t) and str(t) in TIER_RANK else None


def display_names(paths: Sequence[str]) -> Dict[str, str]:
    """path -> the path below the folder all of them share (``a/x.png``, ``b/x.png``), so that same-named
    drawings in different subfolders stay apart; a lone file keeps its base name."""
    paths = [str(p) for p in paths]
    dirs = [os.path.dirname(os.path.abspath(p)) for p in paths]
    try:
        root = os.path.commonpath(dirs) if dirs else ""
    except ValueError:  # paths on different drives
        return {p: p for p in paths}
    return {p: os.path.relpath(os.path.abspath(p), root).replace(os.sep, "/") for p in paths}


def _card(entry: Mapping, uri: Optional[str], size: int, why: str = "", wrong: bool = False,
          shown_name: Optional[str] = None) -> str:
    path = str(entry["path"])
    name = html.escape(shown_name or os.path.basename(path))
    tier = entry.get("tier")
    tier_html = f'<span class="tier" title="tier in the metadata">{html.escape(str(tier))}</span>' if _known(tier) else ""
    picture = (f'<img src="{uri}" alt="{name}" loading="lazy">' if uri
               else '<div class="missing">thumbnail unavailable</div>')
    extra = ""
    pred = entry.get("predicted_tier")
    if _known(pred):
        p = entry.get(f"p_{pred}")
        pct = entry.get("percentile")
        extra += (f'<div><span class="pred">predicted {html.escape(str(pred))}'
                  + (f" ({float(p):.0%})" if _known(p) else "") + "</span>"
                  + (f'<span class="pct">pct {float(pct):.0f}</span>' if _known(pct) else "") + "</div>")
    if _known(entry.get("unusual")) and entry["unusual"] in (True, "True", 1):
        typ = entry.get("typicality")
        extra += ('<div><span class="unusual" title="unlike the drawings this model was trained on: its tier '
                  'probabilities are pulled toward the base rates">unusual'
                  + (f" (typicality {float(typ):.2f})" if _known(typ) else "") + "</span></div>")
    if _known(entry.get("split")):
        extra += f'<div class="split">{html.escape(str(entry["split"]))} split</div>'
    if why:
        extra += f'<div class="why">{html.escape(why)}</div>'
    return (f'<div class="card{" wrong" if wrong else ""}" data-path="{html.escape(path)}">{picture}'
            f'<div><span class="rank">#{int(entry["rank"])}</span>{tier_html}'
            f'<span class="score">{float(entry["score"]):.4f}{_spread(entry)}</span></div>{extra}'
            f'<div class="name" title="{html.escape(path)}">{name}</div></div>')


def _spread(entry: Mapping) -> str:
    std = entry.get("score_std")
    return f" &plusmn; {float(std):.3f}" if _known(std) else ""


def _groups(entries: Sequence[Mapping]) -> List[Tuple[str, List[Mapping]]]:
    """Tier groups in tier order (kept for callers; the page itself shows one list by score)."""
    ordered = sorted(entries, key=lambda e: (int(e["rank"])))
    if not any(_tier(e) for e in entries):
        return [("", ordered)]
    groups: Dict[str, List[Mapping]] = defaultdict(list)
    for e in ordered:
        groups[_tier(e) or NO_TIER].append(e)
    names = sorted(groups, key=lambda t: -TIER_RANK.get(t, -1))
    return [(t, groups[t]) for t in names]


def tier_agreement_interval(scores: Sequence[float], tiers: Sequence[Optional[str]], units: Sequence,
                            resamples: int, level: float = 0.95, seed: int = 0) -> List[float]:
    """Percentile bootstrap interval of ``tier_agreement``: ``units`` (each drawing's own index, or its group)
    drawn with replacement, every drawing weighted by its unit's draws, pairs by the product of their weights.

    Per tier pair the low tier's scores are sorted once; a resample's wins are then its cumulative weights at
    the same ``searchsorted`` positions, so each resample costs O(N), never a pair list."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = resample_counts(units, resamples, seed)  # (resamples, drawings)
    wins = np.zeros(resamples)
    pairs = np.zeros(resamples)
    index = {t: np.flatnonzero(np.asarray([tt == t for tt in tiers])) for t in TIERS}
    names = [t for t in TIERS if len(index[t])]  # best tier first
    for i, hi in enumerate(names):
        for lo in names[i + 1:]:
            order = index[lo][np.argsort(scores[index[lo]], kind="stable")]
            low = scores[order]
            below = np.searchsorted(low, scores[index[hi]], side="left")
            upto = np.searchsorted(low, scores[index[hi]], side="right")
            cum = np.concatenate([np.zeros((resamples, 1)), np.cumsum(counts[:, order], axis=1)], axis=1)
            w_hi = counts[:, index[hi]]
            wins += (w_hi * (cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below]))).sum(axis=1)
            pairs += w_hi.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile_interval(np.where(pairs > 0, wins / pairs, np.nan), level)


def evaluation_basis(entries: Sequence[Mapping], splits_known: bool) -> Tuple[List[Mapping], str]:
    """The drawings agreement figures are computed on, and the sentence that says which they are.

    With the run's split known: the drawings with a tier that were in neither the train nor the val split
    (the test split, or not in the run's metadata). Otherwise every drawing with a tier, labelled as
    possibly including training images."""
    tiered = [e for e in entries if _tier(e)]
    if splits_known:
        held_out = [e for e in tiered if str(e.get("split") or "") not in ("train", "val")]
        seen = {s: sum(1 for e in tiered if e.get("split") == s) for s in ("train", "val")}
        if held_out and not seen["train"] and not seen["val"]:
            return held_out, (f"computed on all {len(held_out)} drawings with a tier, none of which was in the "
                              "training run's train or val split")
        if held_out:
            return held_out, (f"computed on the {len(held_out)} held-out drawings (test split or not in the run): "
                              f"{seen['train']} training and {seen['val']} validation drawings are left out")
        return tiered, (f"computed on all {len(tiered)} drawings with a tier, which INCLUDE {seen['train']} "
                        f"training drawings (the head was fitted on them) and {seen['val']} validation drawings "
                        "(the calibration was fitted on them)")
    return tiered, (f"computed on all {len(tiered)} drawings with a tier; the training run's split is unknown, so "
                    "these MAY INCLUDE training drawings (score.py --run-metadata names the run's metadata to tell "
                    "them apart)")


def disagreements(entries: Sequence[Mapping]) -> List[Tuple[Mapping, str]]:
    """Drawings whose score contradicts their tier, worst first, each with a sentence giving both numbers.

    With tier predictions (a calibrated checkpoint): every drawing whose predicted tier differs from its
    tier, by tier distance and then by the probability given to its true tier (lowest first). Without:
    every drawing in at least one cross-tier pair the scores order the wrong way, by the tier-distance-
    weighted count of such pairs. Empty when the model makes no error on these drawings."""
    tiered = [e for e in entries if _tier(e)]
    if tiered and all(_known(e.get("predicted_tier")) for e in tiered):
        out = []
        for e in tiered:
            t, p = _tier(e), str(e["predicted_tier"])
            gap = abs(TIER_RANK[t] - TIER_RANK[p])
            if gap:
                pct = e.get("percentile")
                out.append((gap, float(e.get(f"p_{t}") or 0.0), e,
                            f"tier {t}, scored like {p}: score {float(e['score']):.3f}"
                            + (f" (percentile {float(pct):.0f})" if _known(pct) else "")
                            + f", P({t}) {float(e.get(f'p_{t}') or 0.0):.2f}"))
        out.sort(key=lambda x: (-x[0], x[1]))
        return [(e, why) for _, _, e, why in out]
    weighted: Dict[int, float] = defaultdict(float)
    worst: Dict[int, Tuple[int, Mapping]] = {}
    for i, a in enumerate(tiered):
        for j, b in enumerate(tiered):
            ta, tb = TIER_RANK[_tier(a)], TIER_RANK[_tier(b)]
            if ta > tb and float(a["score"]) <= float(b["score"]):  # better tier scored no higher
                for k, other in ((i, b), (j, a)):
                    weighted[k] += ta - tb
                    if k not in worst or ta - tb > worst[k][0]:
                        worst[k] = (ta - tb, other)
    order = sorted(weighted, key=lambda k: -weighted[k])
    return [(tiered[k], f"tier {_tier(tiered[k])}, score {float(tiered[k]['score']):.3f}: ordered against "
                        f"tier {_tier(worst[k][1])} drawing(s) such as {os.path.basename(str(worst[k][1]['path']))} "
                        f"(score {float(worst[k][1]['score']):.3f})") for k in order]


def _confusion_html(entries: Sequence[Mapping]) -> str:
    rows = [e for e in entries if _tier(e) and _known(e.get("predicted_tier"))]
    m = confusion_matrix([TIER_RANK[_tier(e)] for e in rows], [TIER_RANK[str(e["predicted_tier"])] for e in rows])
    head = "<tr><th>tier \\ predicted</th>" + "".join(f"<th>{t}</th>" for t in TIERS) + "</tr>"
    body = "".join("<tr><th>" + t + "</th>" + "".join(
        f"<td class='{'diag' if i == j else ''}'>{m[i][j]}</td>" for j in range(4)) + "</tr>"
        for i, t in enumerate(TIERS))
    right = sum(m[i][i] for i in range(4))
    return (f"<table class='confusion'>{head}{body}</table>"
            f"<div class='basis'>{right} of {len(rows)} predicted tiers right ({right / max(len(rows), 1):.0%})</div>")


def _distribution_svg(entries: Sequence[Mapping], calibration: Optional[OrdinalCalibration]) -> str:
    """Per-tier strip plot of scores (one row per tier, a dot per drawing, the median as a bar) as inline SVG."""
    tiered = [e for e in entries if _tier(e)]
    scores = [float(e["score"]) for e in tiered]
    bounds = [b for b in (calibration.boundaries() if calibration is not None else ()) if b == b]
    lo, hi = min(scores + bounds), max(scores + bounds)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    width, left, row_h = 720, 40, 34
    height = row_h * 4 + 30
    x = lambda v: left + (v - lo) / (hi - lo) * (width - left - 10)  # noqa: E731
    colours = TIER_COLOURS
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
             "aria-label='scores per tier'>"]
    rng = np.random.default_rng(0)
    for i, t in enumerate(TIERS):
        y0 = 10 + i * row_h + row_h / 2
        parts.append(f"<text x='8' y='{y0 + 4:.1f}' font-size='13' font-weight='700'>{t}</text>")
        vals = [float(e["score"]) for e in tiered if _tier(e) == t]
        for v in vals:
            parts.append(f"<circle cx='{x(v):.1f}' cy='{y0 + rng.uniform(-9, 9):.1f}' r='3' fill='{colours[t]}' "
                         "fill-opacity='0.6'/>")
        if vals:
            m = float(np.median(vals))
            parts.append(f"<line x1='{x(m):.1f}' x2='{x(m):.1f}' y1='{y0 - 13:.1f}' y2='{y0 + 13:.1f}' "
                         "stroke='#000' stroke-width='2'/>")
    for b, name in zip(calibration.boundaries() if calibration is not None else (), ("C|B", "B|A", "A|S")):
        if b == b and lo <= b <= hi:
            parts.append(f"<line x1='{x(b):.1f}' x2='{x(b):.1f}' y1='4' y2='{height - 22}' stroke='#555' "
                         f"stroke-dasharray='4 3'/><text x='{x(b) + 2:.1f}' y='12' font-size='10'>{name}</text>")
    for v in np.linspace(lo, hi, 6):
        parts.append(f"<text x='{x(v):.1f}' y='{height - 6}' font-size='10' text-anchor='middle'>{v:.2f}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _meta_table(entries: Sequence[Mapping], info: Optional[Mapping[str, object]], basis, basis_text: str,
                calibration: Optional[OrdinalCalibration]) -> str:
    """The table of facts at the top: the checkpoint's info, when written, tier agreement, the calibration."""
    # The checkpoint's accuracy is the pairwise accuracy its best epoch was chosen by, on the validation split.
    meta = {("val pairwise accuracy (chose the epoch)" if k == "accuracy" else k): v for k, v in (info or {}).items()}
    meta.setdefault("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    meta["images scored"] = len(entries)
    agreement = _agreement_text(basis, basis_text)
    if agreement:
        meta["tier agreement"] = agreement
    if calibration is not None:
        meta["tier prediction"] = (f"ordinal logistic calibration fitted on the {calibration.fitted_on} split "
                                   f"({calibration.num_images} drawings); score boundaries C|B, B|A, A|S: "
                                   + ", ".join(f"{b:.3f}" for b in calibration.boundaries())
                                   + "; percentile = share of training drawings scoring at or below")
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in meta.items() if v is not None)
    return f"<table class='meta'>{rows}</table>"


def _agreement_text(basis: Sequence[Mapping], basis_text: str) -> Optional[str]:
    agreement, pairs = tier_agreement([float(e["score"]) for e in basis], [_tier(e) for e in basis])
    return f"{agreement:.1%} of {pairs} cross-tier pairs ordered like the tiers ({basis_text})" if pairs else None


def agreement_summary(entries: Sequence[Mapping], splits_known: bool, resamples: int = 0, level: float = 0.95,
                      group_key: Optional[str] = None, group_name: Optional[str] = None) -> List[str]:
    """The report's agreement figures as console lines: tier agreement (with its bootstrap interval over the
    drawings, or over their ``group_key`` groups, when ``resamples``), and predicted tiers right when the
    entries carry predictions; on the same drawings as the report (``evaluation_basis``). ``group_name`` is what
    the line calls the groups (the metadata column)."""
    basis, basis_text = evaluation_basis(entries, splits_known)
    agreement = _agreement_text(basis, basis_text)
    lines = [f"tier agreement: {agreement}"] if agreement else []
    if agreement and resamples:
        units = [e.get(group_key) if group_key else i for i, e in enumerate(basis)]
        low, high = tier_agreement_interval([float(e["score"]) for e in basis], [_tier(e) for e in basis], units,
                                            resamples, level)
        over = f"{len(set(map(str, units)))} {group_name or group_key} groups" if group_key else f"{len(basis)} drawings"
        lines.append(f"  {level:.0%} interval [{low:.1%}, {high:.1%}] (bootstrap over the {over}, {resamples} "
                     "resamples)")
    predicted = [e for e in basis if _known(e.get("predicted_tier"))]
    if predicted:
        right = sum(1 for e in predicted if str(e["predicted_tier"]) == _tier(e))
        lines.append(f"predicted tier right for {right} of {len(predicted)} drawings ({right / len(predicted):.0%}), "
                     "on the same drawings")
    return lines


def _evaluation_sections(basis, basis_text: str, thumbnails: Mapping[str, Optional[str]], thumb_size: int,
                         names: Mapping[str, str], calibration: Optional[OrdinalCalibration]) -> List[str]:
    """Disagreements, the confusion matrix (when tiers were predicted) and the scores per tier, on ``basis``."""
    parts: List[str] = []
    found = disagreements(basis)
    kind = ("predicted tier differs from the tier" if all(_known(e.get("predicted_tier")) for e in basis)
            else "ordered against a drawing of another tier")
    parts.append(f"<h2 id='disagreements'>Disagreements &middot; {len(found)}</h2>"
                 f"<div class='basis'>Drawings whose score contradicts their tier most ({kind}), worst first; "
                 f"{html.escape(basis_text)}.</div>")
    if found:
        shown = found[:MAX_DISAGREEMENTS]
        parts.append("<div class='grid'>" + "".join(
            _card(e, thumbnails.get(str(e["path"])), thumb_size, why=why, wrong=True,
                  shown_name=names.get(str(e["path"]))) for e, why in shown)
            + "</div>")
        if len(found) > len(shown):
            parts.append(f"<div class='basis'>... and {len(found) - len(shown)} more.</div>")
    else:
        parts.append("<div class='basis'>None: the scores agree with every tier here.</div>")
    if any(_known(e.get("predicted_tier")) for e in basis):
        parts.append("<h2 id='confusion'>Confusion matrix</h2>"
                     f"<div class='basis'>Rows: tier in the metadata; columns: predicted tier; "
                     f"{html.escape(basis_text)}.</div>" + _confusion_html(basis))
    parts.append("<h2 id='distributions'>Scores per tier</h2>"
                 "<div class='basis'>One dot per drawing, the median as a bar"
                 + ("; dashed lines: the calibration's tier boundaries" if calibration is not None else "")
                 + f"; {html.escape(basis_text)}.</div>" + _distribution_svg(basis, calibration))
    return parts


def render_html(entries: Sequence[Mapping], thumbnails: Mapping[str, Optional[str]], *, title: str = "mirip scores",
                info: Optional[Mapping[str, object]] = None, notes: Sequence[str] = (),
                failures: Sequence[Tuple[str, str]] = (), thumb_size: int = 192,
                calibration: Optional[OrdinalCalibration] = None, splits_known: bool = False,
                overlays: Optional[Mapping[str, str]] = None) -> str:
    """The page as a string. ``entries``: dicts with path, score, rank and optionally tier, split,
    predicted_tier, p_S, p_A, p_B, p_C and percentile (the scores.csv columns). ``overlays``: path -> image
    URI of its attribution overlay (``overlay_data_uri``), shown when its thumbnail is clicked."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS % {'w': thumb_size}}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    basis, basis_text = evaluation_basis(entries, splits_known)
    parts.append(_meta_table(entries, info, basis, basis_text, calibration))
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    ordered = sorted(entries, key=lambda e: int(e["rank"]))
    names = display_names([str(e["path"]) for e in entries])
    body = [f"<h2 id='by-score'>All drawings, ordered by score &middot; {len(ordered)}</h2>"]
    body.append("<div class='grid'>" + "".join(_card(e, thumbnails.get(str(e["path"])), thumb_size,
                                                     shown_name=names.get(str(e["path"]))) for e in ordered) + "</div>")
    if basis:
        body += _evaluation_sections(basis, basis_text, thumbnails, thumb_size, names, calibration)
    if failures:
        body.append(f"<h2 id='unreadable'>Could not be read &middot; {len(failures)}</h2><table class='failed'>")
        body += [f"<tr><td>{html.escape(p)}</td><td>{html.escape(r)}</td></tr>" for p, r in failures]
        body.append("</table>")
    parts.append(table_of_contents(body))
    parts += body
    if overlays:
        parts.append(overlay_viewer(overlays))
    parts.append("</body></html>")
    return "\n".join(parts)


def table_of_contents(parts: Sequence[str]) -> str:
    """A bar of links to every section heading in ``parts``, kept at the top while scrolling: the page of a
    few hundred drawings is thousands of pixels long."""
    found = re.findall(r"<h2 id='([^']+)'>(.*?)</h2>", "".join(parts))
    links = "".join(f"<a href='#{anchor}'>{title}</a>" for anchor, title in found)
    return f"<nav class='toc' aria-label='sections'>{links}</nav>"


def write_html_report(path: str, entries: Sequence[Mapping], *, title: str = "mirip scores",
                      info: Optional[Mapping[str, object]] = None, notes: Sequence[str] = (),
                      failures: Sequence[Tuple[str, str]] = (), thumb_size: int = 192, progress: bool = True,
                      calibration: Optional[OrdinalCalibration] = None, splits_known: bool = False,
                      overlays: Optional[Mapping[str, str]] = None) -> str:
    """Make thumbnails of every entry and write the page to ``path``; returns ``path``. ``overlays``: path ->
    overlay PNG file (``scripts/score.py --explain``), embedded and shown when a thumbnail is clicked."""
    thumbnails: Dict[str, Optional[str]] = {}
    for e in tqdm(entries, desc="thumbnails", unit="img", disable=not progress):
        try:
            thumbnails[str(e["path"])] = thumbnail_data_uri(str(e["path"]), thumb_size)
        except (OSError, ValueError):
            thumbnails[str(e["path"])] = None  # scored earlier but gone or changed since; the card says so
    page = render_html(entries, thumbnails, title=title, info=info, notes=notes, failures=failures,
                       thumb_size=thumb_size, calibration=calibration, splits_known=splits_known,
                       overlays=_overlay_uris(overlays))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


# -- attribution overlays (scripts/score.py --explain): click a thumbnail, see where its score comes from ----

_OVERLAY_CSS = ("#ov{display:none;position:fixed;inset:0;background:rgba(0,0,0,.72);z-index:9;align-items:center;"
                "justify-content:center;flex-direction:column;cursor:zoom-out} #ov img{max-width:96vw;max-height:86vh;"
                "background:#fff;padding:6px;border-radius:4px} #ov div{color:#fff;margin-top:.4rem;font-size:.85rem}"
                " .card.has-ov{position:relative} .card.has-ov img{cursor:zoom-in}"
                " .card.has-ov::after{content:'heatmap';"
                "position:absolute;top:10px;right:10px;background:#b2182b;color:#fff;font-size:.7rem;padding:0 .3rem;"
                "border-radius:3px;pointer-events:none}")


def overlay_data_uri(png_path: str, quality: int = 85) -> str:
    """An overlay PNG as a ``data:image/jpeg`` URI (JPEG: a tenth of the PNG's size for the same legibility)."""
    from PIL import Image

    with Image.open(png_path) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _overlay_uris(overlays: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    if not overlays:
        return None
    out = {}
    for path, png in overlays.items():
        try:
            out[str(path)] = overlay_data_uri(png)
        except OSError:
            pass  # written moments ago; a vanished one just leaves its card without a heatmap
    return out


def overlay_viewer(overlays: Mapping[str, str]) -> str:
    """A lightbox and the few lines of script that open it when a card with an overlay is clicked."""
    data = json.dumps(dict(overlays)).replace("</", "<\\/")
    return (f"<style>{_OVERLAY_CSS}</style><div id='ov' role='dialog' aria-label='where the score comes from'>"
            "<img alt='attribution overlay'><div>left: the drawing; right: red cells lift the score, blue drag "
            "it down (relative to a blank page). Click or Esc to close.</div></div>"
            f"<script>(function(){{var O={data},ov=document.getElementById('ov');"
            "document.querySelectorAll('.card').forEach(function(c){var u=O[c.dataset.path];if(!u)return;"
            "c.classList.add('has-ov');var i=c.querySelector('img');if(i)i.addEventListener('click',function(){"
            "ov.querySelector('img').src=u;ov.style.display='flex';});});"
            "ov.addEventListener('click',function(){ov.style.display='none';});"
            "document.addEventListener('keydown',function(e){if(e.key==='Escape')ov.style.display='none';});"
            "})();</script>")
