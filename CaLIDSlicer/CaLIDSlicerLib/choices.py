"""The panel's choices: upsampling factors and the enums of the typed parameter node.

Free of calid, torch and MONAI on purpose: CaLIDSlicer.py imports this when Slicer
loads the module, before the first-use installer has had a chance to install them.
"""

from __future__ import annotations

import enum

FACTORS = (2, 4, 8, 16)


class Method(enum.Enum):
    """Upsampling method; ``label`` is what the panel's combo box shows."""

    CALID = "calid"
    CALID_PLUS = "calid+"
    REGISTRATION = "registration"
    LATENT_LINEAR = "latent-linear"
    LINEAR = "linear"

    def label(self) -> str:
        return {
            Method.CALID: "CaLID (fast, from noise)",
            Method.CALID_PLUS: "CaLID+ (inverted neighbours, slower)",
            Method.REGISTRATION: "Registration (no model: neighbours morphed)",
            Method.LATENT_LINEAR: "Latent linear (baseline)",
            Method.LINEAR: "Linear (baseline, no model)",
        }[self]


    def needs_model(self) -> bool:
        """Whether the method runs a CaLID model (the others work on the pixels, with no model)."""
        return self not in (Method.REGISTRATION, Method.LINEAR)


class FrameSelection(enum.Enum):
    """Which frames of a cine to upsample."""

    ALL = "all"
    CURRENT = "current"
    RANGE = "range"

    def label(self) -> str:
        return {FrameSelection.ALL: "All frames", FrameSelection.CURRENT: "Current frame", FrameSelection.RANGE: "Frames:"}[self]


class PlaceholderSpacing(enum.Enum):
    """What pixel size the network is shown for a cine saved without geometry (all spacings exactly 1 mm)."""

    MODEL = "model"
    KEEP = "keep"
    CUSTOM = "custom"

    def label(self) -> str:
        return {
            PlaceholderSpacing.MODEL: "As in the model's training (no model: 1 mm)",
            PlaceholderSpacing.KEEP: "Keep 1 mm (as stored)",
            PlaceholderSpacing.CUSTOM: "Pixel size (mm):",
        }[self]
