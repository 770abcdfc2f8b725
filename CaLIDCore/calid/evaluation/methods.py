"""Names of the engine's modes and of the methods the evaluation compares, free of heavy imports:
the command line, the Slicer panel and the batch script build their choices from them without
loading PyTorch (``calid --help`` answers at once)."""

from __future__ import annotations

#: The DiffAE-style baseline: DDIM-invert both neighbours, slerp, decode (run by the engine).
INVERSION_SLERP = "inversion-slerp"
#: Registration-based interpolation: the neighbours registered to each other and morphed (no model).
REGISTRATION = "registration"
#: The engine's modes (``upsample(mode=...)``, ``--mode``), in the order they are offered.
UPSAMPLE_MODES: tuple[str, ...] = ("calid", "calid+", "registration", "latent-linear", "linear")
#: Methods that need no model.
PIXEL_METHODS: tuple[str, ...] = ("linear", REGISTRATION)
METHODS: tuple[str, ...] = ("linear", REGISTRATION, "latent-linear", INVERSION_SLERP, "calid", "calid+")
#: The same models with test-time augmentation (8 rotations and reflections of the slice plane, averaged).
TTA_METHODS: tuple[str, ...] = ("calid-tta", "calid+-tta")
ALL_METHODS: tuple[str, ...] = METHODS + TTA_METHODS
STEP_SWEEP: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
