"""OpenAI-compatible HTTP server over one Engine (FastAPI)."""
