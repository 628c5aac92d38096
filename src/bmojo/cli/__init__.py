"""Console scripts: ``bmojo-train``, ``bmojo-eval``, ``bmojo-export``, ``bmojo-generate``."""
