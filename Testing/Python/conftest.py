"""Shared fixtures: the real data beside the repository (skipped when absent) and small phantoms."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from calid.data.phantom import PhantomConfig, make_phantom
from calid.data.stack import CineStack

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("CALID_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


SHARED_LPIPS_WEIGHTS = SHARED_DATA.parent / "weights" / "lpips_alexnet_features.pth"


@pytest.fixture(autouse=True, scope="session")
def offline_lpips_weights():
    """Tests never download: LPIPS reads the shared AlexNet weights, or is unavailable (a
    path that does not exist), never torch.hub's download into the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CALID_LPIPS_WEIGHTS", str(SHARED_LPIPS_WEIGHTS))
    yield SHARED_LPIPS_WEIGHTS if SHARED_LPIPS_WEIGHTS.exists() else None
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def isolated_model_folders(tmp_path_factory):
    """Named models come from the repository's Resources/Models only: never from the developer's
    own model folder or $CALID_MODEL_DIR (a test would then check their model, not the shipped one)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("user-data")))
    patch.delenv("CALID_MODEL_DIR", raising=False)
    patch.delenv("CALID_SHIPPED_MODEL_DIR", raising=False)
    yield
    patch.undo()


def shared_file(*parts: str) -> Path:
    """A file of the shared real data set, or skip the test saying why."""
    return require_shared(SHARED_DATA.joinpath(*parts))


def require_shared(path: Path) -> Path:
    """``path`` (real data or weights beside the repository), or skip the test saying why."""
    if not path.exists():
        reason = f"real data not available: {path} is absent (set CALID_SHARED_DATA to the data folder)"
        if os.environ.get("CALID_REQUIRE_DATA") == "1":  # CI, where the data are beside the clone: a skip would hide it
            pytest.fail(reason + "; CALID_REQUIRE_DATA=1 requires it")
        pytest.skip(reason)
    return path


def reliable_acdc_subjects() -> list[str]:
    manifest = SHARED_DATA / "acdc_cine" / "manifest.json"
    if not manifest.exists():
        return []
    return [entry["file"] for entry in json.loads(manifest.read_text()) if entry["geometry_reliable"]]


@pytest.fixture(scope="session")
def small_phantom():
    """A quick phantom: 6 frames, 64 x 64 pixels of 3 mm, 10 slices (the whole heart)."""
    return make_phantom(3, PhantomConfig(n_frames=6, matrix=64, pixel_spacing_mm=3.0, n_slices=10))


def oblique_stack(frames: int = 3, slices: int = 5, rows: int = 12, columns: int = 10, seed: int = 0) -> CineStack:
    """A stack with an oblique right-handed orientation, anisotropic spacing and frame times."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 2] *= -1
    data = rng.uniform(0, 1000, size=(frames, slices, rows, columns)).round().astype(np.float32)
    return CineStack(
        data=data,
        spacing=(1.367188, 1.4, 8.5),
        origin=(-101.25, 33.125, 17.5),
        direction=q,
        frame_times_ms=np.arange(frames) * 37.5 + 12.0,
        metadata={"subject": "synthetic", "source_dtype": "int16"},
    )
