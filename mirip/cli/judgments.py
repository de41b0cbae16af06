"""The judges' database (scripts/serve.py --judge): export the judged pairs as the CSV training reads.

Examples, from the repository root:

    python scripts/judgments.py export --db judgments.sqlite -o judgments.csv
    python scripts/judgments.py export --db judgments.sqlite            # to the console
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import List, Optional

from mirip.cli.options import DefaultsHelpFormatter
from mirip.judging.store import JudgmentError, JudgmentStore, export_csv_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The judges' SQLite database written by scripts/serve.py --judge.",
                                formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", formatter_class=DefaultsHelpFormatter,
                            help="write the judgments as a CSV of a,b,winner,judge,time (what training reads)")
    export.add_argument("--db", required=True, help="the judgments database (--judgments-db of serve.py)")
    export.add_argument("-o", "--output", default=None, help="CSV to write (default: the console)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.db):
        print(f"error: judgments database not found: {args.db}", file=sys.stderr)
        return 2
    try:
        store = JudgmentStore(args.db)
        judgments = store.all()
        store.close()
    except JudgmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = export_csv_text(judgments)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    with open(args.output, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    judges = Counter(j.judge for j in judgments)
    print(f"wrote {len(judgments)} judgments by {len(judges)} judge(s) to {args.output}"
          + "".join(f"\n  {name}: {n}" for name, n in sorted(judges.items())), file=sys.stderr)
    return 0
