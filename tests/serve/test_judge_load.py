"""Load: 4 simulated judges (plain HTTP, one thread each) making 500 judgments each against one service.

No judgment may be lost or stored twice, no judge may judge a pair twice, and the time from sending an answer
to having the next pair (one round trip: the answer's response carries it) stays under 100 ms at the 99th
percentile on this CPU."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _judge_helpers import judge_app, make_desk  # noqa: E402
from _serve_helpers import running  # noqa: E402
from mirip.judging.desk import read_judges  # noqa: E402
from mirip.judging.pairs import ModelPairSource  # noqa: E402

JUDGES, EACH = 4, 500


def _judge(url, token, latencies, errors):
    with httpx.Client(base_url=url, timeout=30, cookies={"mirip_judge": token}) as client:
        state = client.get("/judge/next").json()
        rng = np.random.default_rng(len(token))
        for _ in range(EACH):
            t0 = time.perf_counter()
            r = client.post("/judge/answer", json={"offer": state["pair"]["offer"],
                                                   "choice": str(rng.choice(["a", "b", "tie"]))})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200 or r.json()["pair"] is None:
                errors.append(r.text)
                return
            state = r.json()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["default", "model"])
def test_four_judges_five_hundred_judgments_each(tmp_path, source):
    desk = make_desk(tmp_path, n=60)  # 1770 pairs, up to 3 judges each
    if source == "model":  # suggest_pairs over made-up scores, as serve.py --features sets it up
        desk.source = ModelPairSource(desk.book, np.random.default_rng(0).normal(size=(3, 60)), seed=0)
    extra = {f"load-judge-{k}-token": f"load{k}" for k in range(JUDGES)}
    desk.judges = {**read_judges(str(tmp_path / "judges.csv")), **extra}
    latencies, errors = [], []
    with running(judge_app(desk), ready=False) as url:
        threads = [threading.Thread(target=_judge, args=(url, t, latencies, errors)) for t in extra]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    assert errors == []
    con = sqlite3.connect(str(tmp_path / "judgments.sqlite"))
    rows = con.execute("SELECT judge, a, b, offer FROM judgments").fetchall()
    con.close()
    assert len(rows) == JUDGES * EACH and len({r[3] for r in rows}) == len(rows)
    for judge in extra.values():
        pairs = [frozenset(r[1:3]) for r in rows if r[0] == judge]
        assert len(pairs) == EACH == len(set(pairs))
    ms = np.array(latencies) * 1000
    p50, p99 = np.percentile(ms, [50, 99])
    print(f"\nload ({source} source): {len(ms)} answers in {wall:.1f} s ({len(ms) / wall:.0f}/s); "
          f"time to the next pair "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms.max():.1f} ms")
    assert p99 <= 100, f"p99 {p99:.1f} ms"
