"""The upsampling engine: :func:`load_pipeline` and :class:`UpsamplingPipeline` (see pipeline.py), and the pixel-space baselines."""

from calid.inference.baselines import VALID_FACTORS, check_factor, upsample_linear
from calid.inference.pipeline import MODES, Cancelled, UpsamplingPipeline, load_pipeline, parse_frames

__all__ = ["MODES", "VALID_FACTORS", "Cancelled", "UpsamplingPipeline", "check_factor", "load_pipeline", "parse_frames", "upsample_linear"]
