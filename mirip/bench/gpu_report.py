"""The GPU suite's report (``mirip.bench.gpu_suite``): the goal table, its markdown, and which numerics and
sync checks failed.
"""

from __future__ import annotations

from typing import Any, Dict, List


def _get(d: Dict[str, Any], *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summary(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's goal table: (figure, baseline, now, goal) from the sections that ran."""
    s = report["sections"]
    rows = [
        ("extraction, bare backbone (img/s)", _get(s, "backbone", "eager_images_per_s"),
         _get(s, "backbone", "compiled_images_per_s"), ">= 220 (H200), >= 200 (H100)"),
        ("extraction pipeline / bare", None, None, ">= 0.97"),
        ("full-image per pair, batch 2 (ms)", _get(s, "full_image", "eager_ms_per_pair"),
         _get(s, "full_image", "compiled_ms_per_pair"), "<= 10"),
        ("head step, batch 32 (ms)", _get(s, "head_step", "eager_ms"), _get(s, "head_step", "graph_ms"), "<= 0.3"),
        ("100 epochs x 10k pairs with validation (s)", _get(s, "training", "eager_100_epoch_s_extrapolated"),
         _get(s, "training", "graph_100_epoch_s"), "<= 15"),
        ("sweep of 16 / 16 sequential runs", None, _get(s, "sweep", "ratio"), "<= 0.05"),
        ("end-to-end / two-stage", _get(s, "end_to_end", "ratio_eager_head"),
         _get(s, "end_to_end", "ratio_graph_head_compiled_backbone") or _get(s, "end_to_end", "ratio"), ">= 300"),
        ("service p99 per request at concurrency 8 (ms)", _get(s, "serve", "in_process", "single_image", "p99_ms"),
         _get(s, "serve", "p99_ms_at_8"), "<= 100"),
    ]
    runs = _get(s, "extraction", "summary") or {}
    offs = [(k, v) for k, v in runs.items() if k.startswith("off@")]
    ons = {k.split("@")[1]: v for k, v in runs.items() if k.startswith("on@")}
    if offs:
        rows[1] = ("extraction pipeline / bare", offs[-1][1]["ratio"],
                   (ons.get(offs[-1][0].split("@")[1]) or {}).get("ratio"), ">= 0.97")
    rss = _get(s, "extraction", "rss") or {}
    if rss:
        text = ", ".join(f"{k}: {v['small_n']}->{v['small_peak_rss_mb']:.0f} MB, N->{v['peak_rss_mb']:.0f} MB"
                         for k, v in rss.items() if v.get("peak_rss_mb") is not None and v.get("small_peak_rss_mb"))
        rows.append(("extraction peak RSS (N/4, N)", text, None, "flat after warm-up"))
        text = ", ".join(f"{k}: {v['small_n']}->{v['small_peak_pss_mb']:.0f} MB, N->{v['peak_pss_mb']:.0f} MB"
                         for k, v in rss.items() if v.get("peak_pss_mb") and v.get("small_peak_pss_mb"))
        if text:  # PSS splits the pages workers share with the main process: the memory the run really holds
            rows.append(("extraction peak PSS (N/4, N)", text, None, "flat after warm-up"))
    return [{"figure": f, "baseline": b, "now": n, "goal": g} for f, b, n, g in rows]


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:,.3f}" if isinstance(v, float) else str(v)


def to_markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# GPU suite: {m['device_name']} ({m['device']}), {m['date']}", "",
             f"{report['backbone']} ({report['weights']} weights), {report['image_size']} px, {report['precision']}"
             + (", quick" if report["quick"] else ""), "", "| figure | baseline | now | goal |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['figure']} | {_fmt(r['baseline'])} | {_fmt(r['now'])} | {r['goal']} |" for r in report["summary"]]
    checks = [("backbone compiled vs eager", _get(report, "sections", "backbone", "numerics", "ok")),
              ("head step graph vs eager", _get(report, "sections", "head_step", "numerics", "ok")),
              ("... with dropout (same masks)", _get(report, "sections", "head_step", "numerics_with_dropout", "ok")),
              ("no host sync inside an epoch", _get(report, "sections", "head_step", "sync_free_epoch", "ok")),
              ("full-image compiled vs eager", _get(report, "sections", "full_image", "numerics", "ok"))]
    lines += ["", "| check | result |", "| --- | --- |"] + [f"| {c} | {_fmt(v)} |" for c, v in checks]
    b = _get(report, "sections", "backbone") or {}
    if "sdpa" in b:
        lines += ["", f"SDPA backend chosen: {b['sdpa']['chosen']} (seconds per batch: {b['sdpa']['seconds']}); "
                      f"compile {b.get('compile_seconds') or 0:.1f} s once; break-even {b.get('break_even_images')} images."]
    if report["failed"]:
        lines += ["", "FAILED sections: " + ", ".join(report["failed"])]
    if report.get("skipped"):
        lines += ["", "SKIPPED sections (time budget, unmeasured): " + ", ".join(report["skipped"])]
    if failed_checks(report):
        lines += ["", "FAILED checks: " + ", ".join(failed_checks(report))]
    return "\n".join(lines) + "\n"


CHECKS = (("backbone", "numerics"), ("backbone", "numerics_padded_batch"), ("head_step", "numerics"),
          ("head_step", "numerics_with_dropout"),
          ("head_step", "sync_free_epoch"), ("full_image", "numerics"))


def failed_checks(report: Dict[str, Any]) -> List[str]:
    """The numerics / sync checks that ran and did not hold, as "section.check"."""
    return [f"{sec}.{chk}" for sec, chk in CHECKS if _get(report["sections"], sec, chk, "ok") is False]


def all_ok(report: Dict[str, Any]) -> bool:
    """No failed section and no check that ran and failed."""
    return not report["failed"] and not failed_checks(report)
