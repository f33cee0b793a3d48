"""The Grafana dashboards' queries for tests: ``from dashboards import dashboard_queries``.

The code lives in ``grafana/generate.py`` (``from grafana.generate import dashboard_queries``
from the repository root); this module puts the repository root on ``sys.path`` so the
import works however pytest was started.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grafana.generate import (  # noqa: E402
    DASHBOARD_DIR,
    DEFAULT_VALUES,
    Query,
    dashboard_queries,
    substitute,
    variable_queries,
)

__all__ = ["DASHBOARD_DIR", "DEFAULT_VALUES", "Query", "dashboard_queries", "substitute", "variable_queries"]
