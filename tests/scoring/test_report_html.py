"""The HTML report's table of contents: a link to every section, in page order, before the first section."""

from __future__ import annotations

import re

from mirip.scoring.report_html import render_html


def _entries():
    rows = []
    for i, (tier, predicted) in enumerate(zip("SSAABBCC", "SAABCBCS")):
        rows.append({"path": f"d/{i}.png", "score": 1.0 - i / 8, "rank": i + 1, "tier": tier, "split": "test",
                     "predicted_tier": predicted, "percentile": 50.0,
                     **{f"p_{t}": (0.7 if t == predicted else 0.1) for t in "SABC"}})
    return rows


def _sections(page):
    """Every h2 heading of the page, whatever its attributes: (id or None, position)."""
    return [(re.search(r"\bid=['\"]([^'\"]+)['\"]", m.group(1)), m.start())
            for m in re.finditer(r"<h2([^>]*)>", page)]


def test_every_section_is_linked_from_the_contents_in_page_order():
    page = render_html(_entries(), {}, failures=[("d/broken.jpg", "not an image")], splits_known=True)
    nav = re.search(r"<nav class='toc'[^>]*>(.*?)</nav>", page, re.S)
    assert nav, "no table of contents"
    links = re.findall(r"<a href='#([^']+)'>", nav.group(1))
    sections = _sections(page)
    assert len(sections) == 5  # all drawings, disagreements, confusion, distributions, unreadable
    assert all(found is not None for found, _ in sections), "a section without an id cannot be linked"
    assert links == [found.group(1) for found, _ in sections]
    assert nav.start() < sections[0][1]
    assert all(page.count(f"id='{anchor}'") == 1 for anchor in links)
    assert "position:sticky" in page  # kept in view on a page thousands of pixels long


def test_a_page_without_tiers_links_only_its_listing():
    page = render_html([{"path": "d/a.png", "score": 1.0, "rank": 1}], {})
    nav = re.search(r"<nav class='toc'[^>]*>(.*?)</nav>", page, re.S)
    assert re.findall(r"<a href='#([^']+)'>", nav.group(1)) == ["by-score"]
