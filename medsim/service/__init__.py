"""medsim serve: the HTTP API (app.py), what it keeps warm (core.py), /metrics (metrics.py) and the page (static/)."""
