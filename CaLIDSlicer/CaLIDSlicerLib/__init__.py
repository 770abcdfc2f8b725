"""Glue between Slicer's MRML scene and the calid package (plain functions, testable headless)."""
