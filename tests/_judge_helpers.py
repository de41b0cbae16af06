"""Helpers for the judging tests: a folder of drawings, a judges file, a desk and its app."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mirip.judging.desk import JudgingDesk, read_judges
from mirip.judging.pairs import PairBook
from mirip.judging.store import JudgmentStore
from mirip.serve.app import create_app
from mirip.serve.config import ServeConfig

TOKENS = {"ana": "token-ana-123", "bo": "token-bo-4567", "<b>cy</b>": "token-cy-8901"}


def drawings(folder, n: int = 12):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        name = f"d{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8), "RGB").save(os.path.join(folder, name))
        names.append(name)
    return names


def judges_file(path):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("name,token\n" + "".join(f"{n},{t}\n" for n, t in TOKENS.items()))
    return str(path)


def make_desk(tmp_path, n: int = 12, max_judges_per_pair: int = 3):
    names = drawings(tmp_path / "images", n)
    store = JudgmentStore(tmp_path / "judgments.sqlite")
    book = PairBook(names, max_judges_per_pair)
    return JudgingDesk(store, book, image_dir=str(tmp_path / "images"),
                       judges=read_judges(judges_file(tmp_path / "judges.csv")))


def judge_app(desk, api_key=None):
    def no_model():
        raise RuntimeError("no scoring model in the judging tests")
    return create_app(ServeConfig(checkpoints=[], device="cpu", api_key=api_key), load=no_model, judging=desk)
