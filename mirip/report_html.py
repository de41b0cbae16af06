"""A self-contained HTML page of scored drawings, so a teacher can look rather than read.

Thumbnails are embedded as base64 JPEG (the page is one file that opens
anywhere, offline), ordered by score, and grouped by tier when tiers are known.
Every card shows the overall rank and the score.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import defaultdict
from datetime import datetime, timezone
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from mirip.preprocessing import load_image
from mirip.tiers import TIER_RANK, TIERS

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
"""


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


def _card(entry: Mapping, uri: Optional[str], size: int) -> str:
    path = str(entry["path"])
    name = html.escape(os.path.basename(path))
    tier = entry.get("tier")
    tier_html = f'<span class="tier">{html.escape(str(tier))}</span>' if tier else ""
    picture = (f'<img src="{uri}" alt="{name}" loading="lazy">' if uri
               else '<div class="missing">thumbnail unavailable</div>')
    return (f'<div class="card" data-path="{html.escape(path)}">{picture}'
            f'<div><span class="rank">#{int(entry["rank"])}</span>{tier_html}'
            f'<span class="score">{float(entry["score"]):.4f}</span></div>'
            f'<div class="name" title="{html.escape(path)}">{name}</div></div>')


def _groups(entries: Sequence[Mapping]) -> List[Tuple[str, List[Mapping]]]:
    ordered = sorted(entries, key=lambda e: (int(e["rank"])))
    if not any(e.get("tier") for e in entries):
        return [("", ordered)]
    groups: Dict[str, List[Mapping]] = defaultdict(list)
    for e in ordered:
        groups[e.get("tier") or NO_TIER].append(e)
    names = sorted(groups, key=lambda t: -TIER_RANK.get(t, -1))
    return [(t, groups[t]) for t in names]


def render_html(entries: Sequence[Mapping], thumbnails: Mapping[str, Optional[str]], *, title: str = "mirip scores",
                info: Optional[Mapping[str, object]] = None, notes: Sequence[str] = (),
                failures: Sequence[Tuple[str, str]] = (), thumb_size: int = 192) -> str:
    """The page as a string. ``entries``: dicts with path, score, rank and optionally tier."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS % {'w': thumb_size}}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    meta = dict(info or {})
    meta.setdefault("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    meta["images scored"] = len(entries)
    tiers = [e.get("tier") for e in entries]
    if any(tiers):
        agreement, pairs = tier_agreement([float(e["score"]) for e in entries], tiers)
        if pairs:
            meta["tier agreement"] = f"{agreement:.1%} of {pairs} cross-tier pairs ordered like the tiers"
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in meta.items() if v is not None)
    parts.append(f"<table class='meta'>{rows}</table>")
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in notes]
    for tier, group in _groups(entries):
        if tier:
            mean = sum(float(e["score"]) for e in group) / len(group)
            label = f"Tier {tier}" if tier != NO_TIER else "No tier in the metadata"
            parts.append(f"<h2>{html.escape(label)} &middot; {len(group)} drawings &middot; mean score {mean:.4f}</h2>")
        parts.append("<div class='grid'>" + "".join(_card(e, thumbnails.get(str(e["path"])), thumb_size)
                                                    for e in group) + "</div>")
    if failures:
        parts.append(f"<h2>Could not be read ({len(failures)})</h2><table class='failed'>")
        parts += [f"<tr><td>{html.escape(p)}</td><td>{html.escape(r)}</td></tr>" for p, r in failures]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: str, entries: Sequence[Mapping], *, title: str = "mirip scores",
                      info: Optional[Mapping[str, object]] = None, notes: Sequence[str] = (),
                      failures: Sequence[Tuple[str, str]] = (), thumb_size: int = 192, progress: bool = True) -> str:
    """Make thumbnails of every entry and write the page to ``path``; returns ``path``."""
    thumbnails: Dict[str, Optional[str]] = {}
    for e in tqdm(entries, desc="thumbnails", unit="img", disable=not progress):
        try:
            thumbnails[str(e["path"])] = thumbnail_data_uri(str(e["path"]), thumb_size)
        except (OSError, ValueError):
            thumbnails[str(e["path"])] = None  # scored earlier but gone or changed since; the card says so
    page = render_html(entries, thumbnails, title=title, info=info, notes=notes, failures=failures,
                       thumb_size=thumb_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
