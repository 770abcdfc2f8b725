"""Upsampling engine (the pixel-space baseline for now; see ARCHITECTURE.md)."""
