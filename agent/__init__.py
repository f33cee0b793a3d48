"""gpu-cost-agent: live, exact GPU energy and cost for Prometheus."""

__version__ = "0.1.0"
