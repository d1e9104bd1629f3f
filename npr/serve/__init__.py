"""`npr serve`: OpenAI-compatible endpoints and a live view of the reasoning tree (see app.py)."""

from __future__ import annotations

from pathlib import Path

from npr.serve.app import ServeConfig, create_app
from npr.serve.loop import EngineLoop

__all__ = ["ServeConfig", "EngineLoop", "create_app", "build", "run"]


def build(model: str | Path, cfg: ServeConfig, trust_remote_code: bool = False, **engine_options):
    """(app, engine loop) for a model folder, run folder or hub id; the loop starts with the app.
    The request budget is capped by the model's context length."""
    from npr.engine import LLM, load

    lm, tok = load(model, trust_remote_code=trust_remote_code)
    llm = LLM(lm, tok, **engine_options)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and cfg.max_tokens_limit > limit:
        cfg.max_tokens_limit = limit
    cfg.max_tokens = min(cfg.max_tokens, cfg.max_tokens_limit)
    engine = EngineLoop(llm)
    return create_app(engine, cfg), engine


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
