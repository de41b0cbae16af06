"""Serve trained heads over HTTP for the app: score, compare and explain drawings sent as uploads.

Examples, from the repository root (needs the serve extra: pip install -e ".[serve]"):

    python scripts/serve.py --checkpoint runs/demo/train/best.pt
    MIRIP_API_KEY=secret python scripts/serve.py --checkpoint best.pt --checkpoint candidate.pt --port 8080
    curl -s -F image=@drawing.jpg http://127.0.0.1:8000/score
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from mirip.cli.options import DefaultsHelpFormatter, plain_warnings
from mirip.common.devices import announce_precision, resolve_device
from mirip.ml.openvino_engine import CACHE_ENV, ENGINES, INSTALL_HINT
from mirip.serve.config import MB, ServeConfig
from mirip.store.checkpoint import CheckpointError, load_checkpoint_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="An HTTP scoring service over trained heads: POST /score, /compare and /explain take images "
                    "as multipart files or base64 JSON; GET /health is 503 until the model is loaded; GET /info "
                    "names the heads, backbone, device and batch settings. Concurrent requests are fused into "
                    "backbone batches. Several --checkpoint heads trained on one cache share one backbone.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="PT",
                   help="a trained head (best.pt); repeat to serve several heads on one backbone, the first is the "
                        "primary one whose fields lead each response")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="backbone precision (default: bf16 on CUDA and on a CPU with AMX or AVX512-BF16, fp32 on other CPUs)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what runs the heads' shared backbone + feature bank pass: torch, or openvino (CPU only; "
                        f'{INSTALL_HINT}; converted once, IR cached under ${CACHE_ENV} or --engine-cache; measured '
                        "1.6-3.7x torch fp32 on an AVX2 CPU, features at cos >= 0.9999). /explain keeps torch: it "
                        "needs the torch backbone's gradients, which stays loaded")
    p.add_argument("--engine-cache", metavar="DIR", default=None,
                   help="where --engine openvino keeps converted models (default: ~/.cache/mirip/openvino)")
    p.add_argument("--backbone", default=None,
                   help="a local directory holding the checkpoints' backbone (for a machine without the hub)")
    p.add_argument("--random-init", action="store_true",
                   help="random backbone weights in place of pretrained ones: scores only exercise the pipeline")
    p.add_argument("--max-batch-size", type=int, default=16, help="images per backbone batch at most")
    p.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long a batch waits after its first image for others to join it")
    p.add_argument("--max-queue", type=int, default=256,
                   help="images that may wait; a request that does not fit gets 503 with Retry-After")
    p.add_argument("--max-images", type=int, default=16,
                   help="images in one request at most (413 beyond); at most --max-queue")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="bytes of one uploaded image at most, in MiB")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="a request's whole body at most, in MiB (base64 JSON is a third larger than the files)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="decoded pixels at most (decompression-bomb limit; default: the library's 179 MP)")
    p.add_argument("--explain-steps", type=int, default=32, help="integration steps of POST /explain")
    p.add_argument("--max-explain-images", type=int, default=4,
                   help="images in one POST /explain at most (an explanation holds the backbone meanwhile)")
    p.add_argument("--api-key-env", default="MIRIP_API_KEY", metavar="VAR",
                   help="environment variable holding the API key; when it is set, every endpoint but /health "
                        "needs the X-API-Key header (a key is never taken on the command line, where ps shows it)")
    p.add_argument("--api-key-file", default=None, help="a file whose first line is the API key")
    judging = p.add_argument_group("judging (--judge): a page where teachers judge pairs, GET /judge?token=...")
    judging.add_argument("--judge", action="store_true",
                         help="also serve the judging page and GET /judgments.csv beside the scoring endpoints")
    judging.add_argument("--metadata", default=None, help="CSV naming the drawings to judge (--filename-column)")
    judging.add_argument("--filename-column", default="filename")
    judging.add_argument("--image-dir", default=None, help="folder the metadata's file names are relative to")
    judging.add_argument("--features", default=None,
                         help="the feature cache of the drawings: pairs come from the suggestion engine over the "
                              "first --checkpoint's scores (without it: pairs of the least-judged drawings)")
    judging.add_argument("--judgments-db", default="judgments.sqlite", help="the SQLite file judgments go to")
    judging.add_argument("--judges", default=None, help="CSV with columns name,token, one judge a line")
    judging.add_argument("--max-judges-per-pair", type=int, default=3,
                         help="how many judges may judge one pair over time")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def _api_key(args) -> Optional[str]:
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as fh:
            return fh.readline().strip() or None
    return os.environ.get(args.api_key_env) or None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_warnings()
    try:
        import uvicorn

        from mirip.serve.app import create_app
    except ImportError as exc:
        print(f"error: the service needs FastAPI and uvicorn ({exc}); install them with: "
              'pip install -e ".[serve]"', file=sys.stderr)
        return 2
    try:
        # Fail now on a missing or corrupt file, before the backbone loads; the first head's features set the
        # precision the shared backbone runs in (load_scorer's default).
        made_in = [(load_checkpoint_file(path).get("fingerprint") or {}).get("precision") for path in args.checkpoint]
        config = ServeConfig(
            checkpoints=list(args.checkpoint), host=args.host, port=args.port, device=args.device,
            backbone=args.backbone, random_init=True if args.random_init else None, precision=args.precision,
            engine=args.engine, engine_cache=args.engine_cache,
            max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms, max_queue=args.max_queue,
            max_images=args.max_images, max_image_bytes=int(args.max_image_mb * MB),
            max_request_bytes=int(args.max_request_mb * MB),
            max_image_pixels=args.max_image_pixels, explain_steps=args.explain_steps,
            max_explain_images=args.max_explain_images, api_key=_api_key(args))
    except (FileNotFoundError, CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.engine == "torch":  # openvino says its plugin's precision when it is built
        announce_precision(resolve_device(args.device), args.precision, features=made_in[0])
    failed: List[str] = []
    server: Optional[uvicorn.Server] = None

    def on_failed(error: str) -> None:
        print(f"error: the model could not be loaded: {error}", file=sys.stderr, flush=True)
        failed.append(error)
        if server is not None:
            server.should_exit = True

    stray = [f for f in ("metadata", "image_dir", "features", "judges") if getattr(args, f) is not None]
    if stray and not args.judge:
        print("error: " + ", ".join("--" + f.replace("_", "-") for f in stray) + " only mean something with --judge",
              file=sys.stderr)
        return 2
    try:
        desk = judging_desk(args) if args.judge else None
    except (FileNotFoundError, ValueError, OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config, on_failed=on_failed, judging=desk)
    auth = "API key required (X-API-Key)" if config.api_key else "no API key (set " + args.api_key_env + " to require one)"
    print(f"mirip serve: {len(config.checkpoints)} head(s) on http://{config.host}:{config.port} | {auth} | "
          f"batches of <= {config.max_batch_size} images, {config.batch_timeout_ms:g} ms wait | "
          f"<= {config.max_images} images of <= {config.max_image_bytes / MB:g} MiB, "
          f"<= {config.max_request_bytes / MB:g} MiB per request", flush=True)
    print("loading the model; GET /health answers 503 until it is ready", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level))
    if desk is not None:  # after uvicorn's Config, which sets its loggers up
        from mirip.serve.judge import RedactTokens

        logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal; SIGTERM's default action
    # would then end a service stopped on purpose with 143 (docker stop, systemctl stop): exit 0 instead.
    signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    except (KeyboardInterrupt, Stopped):
        print("mirip serve: stopped", flush=True)
    return 2 if failed else 0


def judging_desk(args):
    """The desk of --judge: drawings from --metadata under --image-dir, pairs from the checkpoint's scores of
    --features when given, judgments into --judgments-db."""
    from mirip.common.metadata_csv import read_metadata_csv
    from mirip.judging.desk import JudgingDesk, drawings_under, read_judges
    from mirip.judging.next_pairs import ensemble_scores
    from mirip.judging.pairs import ModelPairSource, PairBook
    from mirip.judging.store import JudgmentStore

    missing = [f for f in ("metadata", "image_dir", "judges") if getattr(args, f) is None]
    if missing:
        raise ValueError("--judge needs " + ", ".join("--" + f.replace("_", "-") for f in missing))
    for flag in ("metadata", "judges", "features"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag} file not found: {path}")
    frame = read_metadata_csv(args.metadata)
    if args.filename_column not in frame.columns:
        raise ValueError(f"{args.metadata} has no column {args.filename_column!r} (it has {list(frame.columns)})")
    names = drawings_under(args.image_dir, frame[args.filename_column].astype(str).tolist(), args.metadata)
    judges = read_judges(args.judges)
    book = PairBook(names, args.max_judges_per_pair)
    source = None
    if args.features:
        scores, probability, uncalibrated = ensemble_scores(args.checkpoint[:1], args.features, names)
        if uncalibrated:
            print(f"note: {uncalibrated[0]} has no calibration; P(a better) from the raw score difference",
                  flush=True)
        source = ModelPairSource(book, scores, probability)
    desk = JudgingDesk(JudgmentStore(args.judgments_db), book, source, args.image_dir, judges)
    stored = sum(len(v) for v in book.judged.values())
    how = "suggested from the first head's scores" if source else "of the least-judged drawings"
    print(f"judging: {len(names)} drawings, {len(judges)} judges, {stored} judgments in {args.judgments_db}"
          + (f" ({desk.unknown} of drawings not in the metadata)" if desk.unknown else "")
          + f"; pairs {how}; "
          f"open http://{args.host}:{args.port}/judge?token=...", flush=True)
    return desk


class Stopped(Exception):
    """SIGTERM arrived: the service was stopped on purpose."""


def _stopped(signum, frame):
    raise Stopped()

