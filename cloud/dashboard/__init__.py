"""`fleet serve`: the dashboard over the collector's database (FastAPI, Jinja2 templates, inline SVG).

Needs the `cloud` extra (fastapi, uvicorn, jinja2); `fleet serve` says so when it is missing."""
