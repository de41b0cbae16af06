"""``mirip COMMAND ...``: one installed command over the pipeline's steps, in the order a day runs them.

Each subcommand is a module of this package with ``build_parser()`` and ``main(argv) -> int``; it is
imported only when asked for, so ``mirip train`` never loads stage one's extraction pipeline.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import List, NoReturn, Optional

# name -> (module, what it does); in pipeline order, as `mirip --help` lists them
COMMANDS = {
    "demo": ("mirip.cli.demo", "write the procedurally drawn demo dataset (images + metadata.csv)"),
    "extract": ("mirip.cli.extract", "stage one: frozen-backbone features of every image into an HDF5 cache"),
    "train": ("mirip.cli.train", "stage two: train a ranking head on a cache, report it on the test split"),
    "evaluate": ("mirip.cli.evaluate", "metrics of a trained checkpoint on a cache's split"),
    "sweep": ("mirip.cli.sweep", "many heads over margins, dims, feature specs and caches, mean +- std over seeds"),
    "suggest": ("mirip.cli.suggest_pairs", "the next pairs of drawings worth a teacher's judgment"),
    "score": ("mirip.cli.score", "score new drawings: tiers, percentiles, CSV, HTML report, heatmaps"),
    "serve": ("mirip.cli.serve", "the scoring service over HTTP (needs the serve extra)"),
    "judgments": ("mirip.cli.judgments", "the judges' database: export the judged pairs as the CSV training reads"),
    "benchmark": ("mirip.cli.benchmark", "speed and memory of each stage beside its baseline"),
    "gpu-check": ("mirip.cli.gpu_check", "every GPU speed goal in one prepared run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mirip COMMAND [options]   (mirip COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mirip import __version__
        print(f"mirip {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"mirip: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"mirip {name}"  # argparse's prog: usage lines and errors name the subcommand
    return module.main(argv[1:])


def leave(code: int) -> NoReturn:
    """Exit with ``code``; under torchrun without the interpreter's teardown.

    By then every cache is closed, the process group destroyed and the summary printed, yet about one exit in
    25 on a loaded 2-core machine aborted in C++ during teardown ("terminate called without an active
    exception"), failing a run whose work was done.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def run() -> NoReturn:
    """The ``mirip`` console script."""
    leave(main())
