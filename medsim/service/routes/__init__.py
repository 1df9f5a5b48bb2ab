"""One router per resource: search, images, state (models, datasets, status, health, metrics)."""
