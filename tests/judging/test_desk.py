"""Comparative judging: the SQLite store, the pair rules, the HTTP endpoints and their refusals."""

from __future__ import annotations

import csv
import io
import itertools
import math
import sqlite3

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _judge_helpers import TOKENS, judge_app, make_desk  # noqa: E402
from _serve_helpers import running  # noqa: E402
from mirip.judging.pairs import FewestJudgedPairs, ModelPairSource, PairBook  # noqa: E402
from mirip.judging.store import JudgmentStore  # noqa: E402


def _rows(path):
    """The database read with sqlite3 directly, not through the store."""
    con = sqlite3.connect(str(path))
    try:
        return con.execute("SELECT judge, a, b, winner FROM judgments ORDER BY id").fetchall()
    finally:
        con.close()


def test_store_is_wal_durable_refuses_replays_and_undoes(tmp_path):
    db = tmp_path / "j.sqlite"
    store = JudgmentStore(db)
    store.add("ana", "x.png", "y.png", "a", 1.0, "o1")
    store.add("bo", "x.png", "z.png", "tie", 2.0, "o2")
    with pytest.raises(ValueError, match="already answered"):
        store.add("ana", "x.png", "y.png", "b", 1.0, "o1")
    store.add("ana", "y.png", "z.png", "b", 3.0, "o3")
    assert store.undo_last("ana").offer == "o3"
    store.close()
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert _rows(db) == [("ana", "x.png", "y.png", "a"), ("bo", "x.png", "z.png", "tie")]
    again = JudgmentStore(db)  # a restart
    assert [j.offer for j in again.all()] == ["o1", "o2"]


def _documented_value(scores, counts, i, j, slope):
    """suggest_pairs' documented value of one pair, in plain Python: (uncertainty + disagreement) * need."""
    ps = [1 / (1 + math.exp(-slope * (m[i] - m[j]))) for m in scores]
    p = sum(ps) / len(ps)
    sd = math.sqrt(sum((x - p) ** 2 for x in ps) / len(ps))
    return ((1 - abs(2 * p - 1)) + 2 * sd) / (1 + (counts[i] + counts[j]) / 2)


def _naive_best(book, scores, judge, slope):
    eligible = [p for p in itertools.combinations(range(len(book.names)), 2) if book.eligible(judge, p)]
    counts = [int(c) for c in book.drawing_counts]
    return max(eligible, key=lambda p: _documented_value(scores, counts, *p, slope))


def test_model_source_asks_the_pair_the_suggestion_engine_values_most():
    n, slope = 30, 1.6
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(2, n))  # two ensemble members: their disagreement counts too
    book = PairBook([f"d{i}" for i in range(n)], max_judges_per_pair=2)
    source = ModelPairSource(book, scores, lambda d: 1 / (1 + np.exp(-slope * d)), seed=0, window=n)
    for step in range(25):  # judgments by three judges shift the counts; skips and offers bar pairs
        judge = ("ana", "bo", "cy")[step % 3]
        best = _naive_best(book, scores, judge, slope)
        assert source.next_pairs(judge, 1) == [best], step
        if step % 5 == 4:
            book.skipped.setdefault(judge, set()).add(best)
        elif step % 7 == 6:
            book.offered[best] = "dee"  # open elsewhere: nobody else may have it meanwhile
        else:
            book.record(judge, *best)
    assert all(book.eligible("bo", p) for p in source.next_pairs("bo", 40))


def test_model_source_falls_back_when_the_neighbours_are_spent():
    names = [f"d{i}" for i in range(12)]
    book = PairBook(names, max_judges_per_pair=1)
    source = ModelPairSource(book, np.arange(12.0), seed=0, window=1)  # x4 widening: neighbours 4 apart at most
    for i, j in itertools.combinations(range(12), 2):
        if j - i <= 4:
            book.record("bo", i, j)
    picks = source.next_pairs("ana", 100)
    left = [p for p in itertools.combinations(range(12), 2) if p[1] - p[0] > 4]
    assert sorted(picks) == left and book.left("ana") == len(left)


def test_a_judge_never_gets_a_pair_judged_skipped_or_offered_elsewhere():
    book = PairBook(["w", "x", "y", "z"], max_judges_per_pair=3)
    source = FewestJudgedPairs(book, seed=0)
    every = list(itertools.combinations(range(4), 2))
    for pair in every[:5]:
        book.record("ana", *pair)
    assert source.next_pairs("ana", 6) == [every[5]]
    assert sorted(source.next_pairs("bo", 6)) == every
    book.offered[every[5]] = "bo"
    assert source.next_pairs("ana", 6) == [] and book.left("ana") == 0
    del book.offered[every[5]]
    book.skipped["ana"] = {every[5]}
    assert source.next_pairs("ana", 6) == []


def test_two_judges_are_never_offered_one_pair_at_once(tmp_path):
    desk = make_desk(tmp_path, n=2)
    first = desk.next("ana")
    assert first["pair"] is not None and desk.next("bo")["pair"] is None
    desk.answer("ana", first["pair"]["offer"], "skip")  # ana lets it go: now bo may have it
    assert desk.next("bo")["pair"] is not None


@pytest.fixture
def served(tmp_path):
    desk = make_desk(tmp_path)
    with running(judge_app(desk, api_key="scoring-key"), ready=False) as url:
        yield desk, url, tmp_path / "judgments.sqlite"


def _client(url, judge):
    client = httpx.Client(base_url=url, timeout=10)
    r = client.get("/judge", params={"token": TOKENS[judge]}, follow_redirects=False)
    assert r.status_code == 303 and "mirip_judge" in r.cookies
    return client


def test_token_cookie_page_and_escaped_name(served):
    desk, url, db = served
    assert httpx.get(url + "/judge").status_code == 401
    assert httpx.get(url + "/judge", params={"token": "wrong-token"}).status_code == 401
    assert httpx.get(url + "/judge/next").status_code == 401
    assert httpx.get(url + "/judgments.csv").status_code == 401
    client = _client(url, "<b>cy</b>")
    page = client.get("/judge")
    assert page.status_code == 200 and "&lt;b&gt;cy&lt;/b&gt;" in page.text and "<b>cy</b>" not in page.text
    assert httpx.get(url + "/info").status_code == 401  # the scoring API key still guards the scoring side


def test_answers_undo_export_and_never_the_same_pair_twice(served):
    desk, url, db = served
    ana, bo = _client(url, "ana"), _client(url, "bo")
    a, b = ana.get("/judge/next").json(), bo.get("/judge/next").json()
    assert {a["pair"]["a"]["id"], a["pair"]["b"]["id"]} != {b["pair"]["a"]["id"], b["pair"]["b"]["id"]}
    img = ana.get(f"/judge/image/{a['pair']['a']['id']}")
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
    mine = {a["pair"]["a"]["id"], a["pair"]["b"]["id"]}
    other = next(i for i in range(len(desk.book.names)) if i not in mine)
    assert ana.get(f"/judge/image/{other}").status_code == 404  # a drawing not in ana's pair
    seen, made, offers, state = set(), [], [], a
    for choice in ["a", "b", "tie", "skip", "a"]:
        pair = state["pair"]
        key = frozenset((pair["a"]["id"], pair["b"]["id"]))
        assert key not in seen
        seen.add(key)
        if choice != "skip":
            made.append(("ana", pair["a"]["name"], pair["b"]["name"], choice))
            offers.append(pair["offer"])
        state = ana.post("/judge/answer", json={"offer": pair["offer"], "choice": choice}).json()
    assert state["judged_total"] == 4
    undone = ana.post("/judge/undo", json={}).json()
    assert {k: undone["undone"][k] for k in "ab"} == {"a": made[-1][1], "b": made[-1][2]}
    assert undone["undone"]["offer"] == offers[-1]  # the page uncounts it only when it answered that offer
    assert {undone["pair"]["a"]["name"], undone["pair"]["b"]["name"]} == set(made[-1][1:3])
    made.pop()
    assert _rows(db) == made
    exported = list(csv.DictReader(io.StringIO(ana.get("/judgments.csv").text)))
    assert [tuple(r) for r in exported] == [("a", "b", "winner", "judge", "time")] * 3
    assert [(r["judge"], r["a"], r["b"], r["winner"]) for r in exported] == made


def test_bad_answers_are_refused_and_write_nothing(served):
    desk, url, db = served
    ana, bo = _client(url, "ana"), _client(url, "bo")
    offer = ana.get("/judge/next").json()["pair"]["offer"]
    bo_offer = bo.get("/judge/next").json()["pair"]["offer"]
    assert ana.post("/judge/answer", json={"offer": "forged-offer-id", "choice": "a"}).status_code == 409
    assert ana.post("/judge/answer", json={"offer": bo_offer, "choice": "a"}).status_code == 403
    assert ana.post("/judge/answer", json={"offer": offer, "choice": "left"}).status_code == 400
    assert ana.post("/judge/answer", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
    long = ana.post("/judge/answer", json={"offer": offer, "choice": "a", "pad": "x" * 5000})
    assert long.status_code == 413
    assert _rows(db) == []
    assert ana.post("/judge/answer", json={"offer": offer, "choice": "a"}).status_code == 200
    assert ana.post("/judge/answer", json={"offer": offer, "choice": "b"}).status_code == 409  # a replay
    assert len(_rows(db)) == 1
    for bad in ("../judges.csv", "999", "-1"):
        assert ana.get(f"/judge/image/{bad}").status_code == 404


def test_a_restart_keeps_every_judgment_and_what_each_judge_has_seen(tmp_path):
    desk = make_desk(tmp_path, n=4, max_judges_per_pair=1)  # 6 pairs, each judged once
    with running(judge_app(desk), ready=False) as url:
        ana = _client(url, "ana")
        state = ana.get("/judge/next").json()
        for _ in range(3):
            state = ana.post("/judge/answer", json={"offer": state["pair"]["offer"], "choice": "a"}).json()
    desk.store.close()
    before = _rows(tmp_path / "judgments.sqlite")
    assert len(before) == 3
    desk = make_desk(tmp_path, n=4, max_judges_per_pair=1)
    with running(judge_app(desk), ready=False) as url:
        bo = _client(url, "bo")
        judged = {frozenset(r[1:3]) for r in before}
        state = bo.get("/judge/next").json()
        for _ in range(3):
            assert frozenset((state["pair"]["a"]["name"], state["pair"]["b"]["name"])) not in judged
            state = bo.post("/judge/answer", json={"offer": state["pair"]["offer"], "choice": "b"}).json()
        assert state["pair"] is None and state["left"] == 0
    assert _rows(tmp_path / "judgments.sqlite")[:3] == before


def test_suggestions_give_up_at_once_when_every_neighbour_pair_is_barred(monkeypatch):
    from mirip.judging import suggest

    n = 300
    scores = np.random.default_rng(1).normal(size=n)
    first, second = suggest.candidate_pairs(scores, 2)
    barred = [frozenset((int(i), int(j))) for i, j in zip(first, second)]
    calls = []
    real = suggest.candidate_pairs
    monkeypatch.setattr(suggest, "candidate_pairs", lambda *a: calls.append(1) or real(*a))
    assert suggest.suggest_pairs(scores, np.zeros(n), barred, 1, window=2) == []
    assert len(calls) <= 2  # not one pass per raised cap (n passes: seconds for a few thousand drawings)
