"""``gpu-cost-agent report``: the bill of a period, read from Prometheus or per-job records.

Never imported by the daemon (tests/test_daemon_imports.py): ``agent.cli`` hands the
``report`` command to :func:`agent.report.cli.main` before anything else is loaded.

- :mod:`.promapi` — the query API client (auth, TLS, partial answers are errors);
- :mod:`.period` — months and stretches in the tariff's time zone;
- :mod:`.series` — exact increases of counters (births, resets, no extrapolation);
- :mod:`.bill` — rows per group and currency, idle capacity, reconciliation;
- :mod:`.records` — the same bill from per-job records (agent/jobrecords.py);
- :mod:`.formats` — CSV, JSON, FOCUS; :mod:`.html` — the page with inline SVG charts.
"""
