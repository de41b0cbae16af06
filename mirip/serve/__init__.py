"""The scoring service: an HTTP API over ``mirip.scoring.scorer.Scorer`` for the app (``scripts/serve.py``).

One process keeps the backbone loaded once; concurrent requests are fused into bounded backbone batches
(``batcher``); several heads trained on one cache share that backbone (``heads``); uploads are decoded in
memory with limits on bytes, pixels and image count (``uploads``); ``app`` wires them into FastAPI endpoints.
FastAPI and uvicorn come with the optional extra: ``pip install -e ".[serve]"``.
"""
