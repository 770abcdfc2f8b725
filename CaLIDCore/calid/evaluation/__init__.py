"""Metrics, reports and figures."""
