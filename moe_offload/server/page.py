"""The browser chat page and its live expert view: static files, security headers and GET /v1/experts.

The page is plain HTML/CSS/JS in ``static/`` (no build step, nothing fetched from elsewhere). It talks to the
server only through the public API (``/v1/chat/completions`` with streaming, ``/v1/experts``), so it needs
the API key like any other client; the page and its files load without it so that it can ask for the key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine
from ..offload.snapshot import LEGEND, ExpertSnapshot, resident_snapshot, snapshot
from ..scheduler import Scheduler

STATIC = Path(__file__).parent / "static"
# Only the page's own origin: no inline script or style, no third-party fetches, no framing.
CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


class SecurityHeaders:
    """Adds the headers above to every response (pure ASGI, so streaming and disconnects pass untouched)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if page:  # revalidate (ETag), so an upgraded package never runs stale JS
                    headers["cache-control"] = "no-cache"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_page(app: FastAPI, engine: Engine, scheduler: Scheduler, api_key_required: bool) -> None:
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/page.json", include_in_schema=False)
    async def page_config():
        # Public on purpose: the page must know whether to ask for a key before it can send one.
        return {"api_key_required": api_key_required}

    @app.get("/v1/experts")
    async def experts():
        return expert_view(engine, scheduler)


def expert_snapshot(engine: Engine) -> tuple[ExpertSnapshot, list[int]]:
    """The snapshot and the decoder layer index of each of its rows."""
    c = engine.config
    moe_layers = list(c.moe_layers)  # families with dense layers leave those out of the grid
    if engine.expert_cache is None:
        return resident_snapshot(moe_layers, c.num_experts), moe_layers
    snap = snapshot(engine.expert_cache)
    if snap.layers == tuple(range(len(moe_layers))):  # the MoE layers numbered 0, 1, ...: label the real ones
        return snap, moe_layers
    # numbered by decoder layer: leave out dense layers (a store may hold keys for them that nothing uses)
    rows = [i for i, layer in enumerate(snap.layers) if layer in moe_layers]
    layers = [snap.layers[i] for i in rows]
    return ExpertSnapshot(tuple(layers), snap.num_experts, tuple(snap.grid[i] for i in rows)), layers


def expert_view(engine: Engine, scheduler: Scheduler) -> dict:
    """The JSON of GET /v1/experts (documented in the README's Server section)."""
    snap, layers = expert_snapshot(engine)
    m, busy = scheduler.metrics, scheduler.depth > 0
    view = {"offloaded": engine.expert_cache is not None, "layers": layers,
            "num_experts": snap.num_experts, "grid": list(snap.grid), "counts": snap.counts(), "legend": LEGEND,
            "busy": busy, "tokens_per_s": m.live_decode_tok_s if busy else m.last_decode_tok_s,
            "hit_rate": 1.0, "prefetch_recall": None, "bytes_copied_per_token": 0.0, "tokens": 0}
    stats = engine.cache_stats
    if stats is not None:
        s = stats.summary()
        guessed = any(layer.needed_with_guess for layer in stats.layers)  # recall is undefined before any guess
        view.update(hit_rate=s["hit_rate"], prefetch_recall=s["prefetch_recall"] if guessed else None,
                    bytes_copied_per_token=s["bytes_copied_per_token"], tokens=stats.tokens)
    return view
