"""LV cavity, LV myocardium and RV cavity segmentation of short-axis slices (2D MONAI U-Net)."""

from calid.segmentation.model import LABELS, SegmentationConfig, SegmentationModel, load_segmenter, save_segmenter
from calid.segmentation.inference import heart_centre_lps, keep_largest_components, segment

__all__ = ["LABELS", "SegmentationConfig", "SegmentationModel", "heart_centre_lps", "keep_largest_components", "load_segmenter", "save_segmenter", "segment"]
