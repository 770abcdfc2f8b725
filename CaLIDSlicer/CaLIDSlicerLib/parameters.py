"""How the values of the module's typed parameter node become :class:`~CaLIDSlicerLib.logic.UpsamplingOptions`.

The parameter node class itself (``CaLIDSlicerParameterNode`` in CaLIDSlicer.py) is
declared with Slicer's ``parameterNodeWrapper``, which only exists inside Slicer; its
value types live in :mod:`CaLIDSlicerLib.choices` (re-exported here), and this
conversion here, so that both are tested headless.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calid.data.stack import fixed_placeholder_mm
from calid.errors import InputError

from CaLIDSlicerLib.choices import FACTORS, FrameSelection, Method, PlaceholderSpacing
from CaLIDSlicerLib.logic import UpsamplingOptions

__all__ = ["FACTORS", "FrameSelection", "Method", "PlaceholderSpacing", "options_from_parameters"]


def options_from_parameters(parameters: Any, current_frame: int = 0, plane_points_lps: np.ndarray | None = None) -> UpsamplingOptions:
    """The options of one run from the parameter node's values (any object with its attributes).

    Args:
        parameters: the typed parameter node (or anything with the same attributes).
        current_frame: the frame the input cine's browser shows (``FrameSelection.CURRENT``).
        plane_points_lps: the points of the ``planePoints`` markups, (N, 3) LPS mm: one point is
            the aortic valve (3-chamber plane), three points define a plane of the user's own.
    """
    if int(parameters.factor) not in FACTORS:
        raise InputError("factor", f"choose one of {', '.join(f'x{f}' for f in FACTORS)}, got {parameters.factor!r}")
    selection = FrameSelection(parameters.frames)
    if selection is FrameSelection.ALL:
        frames = None
    elif selection is FrameSelection.CURRENT:
        frames = str(int(current_frame))
    else:
        frames = str(parameters.frameRange).strip()
        if not frames:
            raise InputError("frames", "type the frames to upsample, e.g. 0,5-9 (frames count from 0)")
    points = None if plane_points_lps is None else np.asarray(plane_points_lps, dtype=np.float64).reshape(-1, 3)
    if points is not None and len(points) not in (0, 1, 3):
        raise InputError(
            "long-axis points", f"place 1 point (aortic valve, for the 3-chamber view) or 3 points (a plane of your own), not {len(points)}"
        )
    if points is not None and len(points) == 3:
        from calid.geometry.planes import Plane

        try:
            Plane.from_points("user", *points)  # checked now, not after minutes of upsampling
        except InputError as error:
            raise InputError("long-axis points", f"the 3 points do not define a plane: {error.problem}") from None
    placeholder = PlaceholderSpacing(getattr(parameters, "placeholderSpacing", PlaceholderSpacing.MODEL))
    placeholder_spacing = placeholder.value
    if placeholder is PlaceholderSpacing.CUSTOM:
        size = fixed_placeholder_mm(float(parameters.placeholderPixelMm), words=(), option="pixel size for files without geometry")
        placeholder_spacing = f"{size:g}"
    return UpsamplingOptions(
        factor=int(parameters.factor),
        mode=Method(parameters.method).value,
        steps=int(parameters.steps) or None,  # 0 on the panel: the model's default
        seed=int(parameters.seed),
        device=str(parameters.device) or "auto",
        model=str(parameters.model) or None,
        frames=frames,
        segment=bool(parameters.segment),
        centre_on_heart=bool(getattr(parameters, "centreOnHeart", False)),
        placeholder_spacing=placeholder_spacing,
        tta=bool(getattr(parameters, "testTimeAugmentation", False)),
        plane_points_lps=None if points is None or len(points) == 0 else tuple(map(tuple, points)),
    )
