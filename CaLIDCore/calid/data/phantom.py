"""A synthetic beating-heart cine with labels, dense ground truth and a sparse acquisition.

The heart is built from analytic shapes in short-axis (SAX) orientation, the
slice axis being the left-ventricular (LV) long axis pointing from apex to base:

* LV cavity: a half prolate ellipsoid (semi-axes a, a, c) below the basal plane;
* LV myocardium: the shell to a wider ellipsoid (a + wall, c + apical wall);
* RV cavity: an ellipsoid beside the septum minus the LV epicardium (a crescent),
  with a thin free wall;
* above the base, an unlabelled left-atrial blood pool; around the heart a patchy
  epicardial fat layer, lungs, a body outline and smooth tissue texture.

Over the cardiac cycle the LV cavity follows a realistic volume curve (fast
ejection, rapid filling, diastasis, atrial kick), the base descends towards the
apex in systole, the myocardial volume is conserved (so the wall thickens) and
the RV follows its own curve. Images have bright blood and dark myocardium,
a smooth coil-sensitivity shading and Rician noise.

:func:`make_phantom` returns the dense truth (``dense_factor`` thin slices per
acquired gap) and the sparse acquisition whose slices are the slice-profile
(box of ``slice_thickness_mm``) averages of the dense slices, exactly; sparse
labels are the dense labels at the slice centres. Labels follow ACDC:
0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from calid.data.stack import CineStack

LABEL_NAMES = {0: "background", 1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
RV_CAVITY, LV_MYOCARDIUM, LV_CAVITY = 1, 2, 3
#: Scanner-like intensity of blood (arbitrary units, like a magnitude image).
BLOOD_INTENSITY = 800.0


@dataclass(frozen=True)
class PhantomConfig:
    """Acquisition and anatomy ranges of the phantom.

    Args:
        n_frames: frames over one cardiac cycle.
        matrix: in-plane size (rows = columns).
        pixel_spacing_mm: in-plane pixel size.
        n_slices: acquired (sparse) slices.
        slice_spacing_mm: distance between acquired slice centres.
        slice_thickness_mm: width of the acquired slice profile (box), averaged over the dense slices.
        dense_factor: dense slices per acquired gap (the truth has slice spacing
            ``slice_spacing_mm / dense_factor``); 8 allows scoring x2, x4 and x8 upsampling.
        noise_sigma: Rician noise level relative to blood intensity.
        direction: 3x3 LPS direction of the stack (columns x, y, z); default: an oblique SAX orientation.
    """

    n_frames: int = 20
    matrix: int = 128
    pixel_spacing_mm: float = 1.5
    n_slices: int = 10
    slice_spacing_mm: float = 10.0
    slice_thickness_mm: float = 8.0
    dense_factor: int = 8
    noise_sigma: float = 0.03
    direction: tuple[tuple[float, float, float], ...] | None = None


@dataclass
class Phantom:
    """Dense truth and sparse acquisition of one synthetic subject."""

    dense: CineStack
    dense_labels: CineStack
    sparse: CineStack
    sparse_labels: CineStack
    #: Index of each sparse slice's centre in the dense stack.
    sparse_to_dense_index: np.ndarray
    #: Per-frame relative LV cavity volume of the analytic model (1 at end-diastole).
    lv_volume_curve: np.ndarray
    #: End-systolic frame of the analytic model.
    es_frame: int
    anatomy: dict[str, float] = field(default_factory=dict)

    def truth_for_factor(self, factor: int, profile: str = "slab") -> CineStack:
        """Truth on the grid of the sparse stack upsampled by ``factor`` (its first to last slice).

        ``profile="slab"`` (default) gives what the scanner would have acquired at
        every position: the dense slices averaged over the acquisition's slice
        profile, so the acquired slices equal their truth and a score measures
        interpolation alone. ``"thin"`` gives the dense slices themselves.
        """
        if profile not in ("slab", "thin"):
            raise ValueError(f"profile must be 'slab' or 'thin', got {profile!r}")
        index = self._grid_index(factor)
        if profile == "slab":
            weights = slice_profile_weights(self.dense.slice_spacing, float(self.sparse.metadata["slice_thickness_mm"]))
            margin = len(weights) // 2
            data = np.stack([np.tensordot(self.dense.data[:, k - margin : k + margin + 1], weights, axes=([1], [0])) for k in index], axis=1)
        else:
            data = self.dense.data[:, index]
        return self._on_upsampled_grid(self.dense, data.astype(np.float32), factor)

    def labels_for_factor(self, factor: int) -> CineStack:
        """Labels at the slice centres of the grid of :meth:`truth_for_factor`."""
        return self._on_upsampled_grid(self.dense_labels, self.dense_labels.data[:, self._grid_index(factor)], factor)

    def _grid_index(self, factor: int) -> np.ndarray:
        """Dense slice indices of the sparse stack's grid upsampled by ``factor``."""
        dense_factor = int(self.dense.metadata["dense_factor"])
        if factor < 1 or dense_factor % factor:
            raise ValueError(f"factor {factor} does not divide the phantom's dense factor {dense_factor}")
        first, last = int(self.sparse_to_dense_index[0]), int(self.sparse_to_dense_index[-1])
        return np.arange(first, last + 1, dense_factor // factor)

    def _on_upsampled_grid(self, like: CineStack, data: np.ndarray, factor: int) -> CineStack:
        first = int(self.sparse_to_dense_index[0])
        return like.with_data(
            data,
            spacing=(self.dense.spacing[0], self.dense.spacing[1], self.sparse.slice_spacing / factor),
            origin=tuple(self.dense.slice_origin(first)),
        )


def volume_curve(phase: np.ndarray, end_systolic_fraction: float, es_phase: float = 0.35) -> np.ndarray:
    """Relative LV volume over one cycle (phase in [0, 1), end-diastole at 0).

    Systolic ejection (half cosine to ``end_systolic_fraction`` at ``es_phase``),
    rapid filling (70 % of the stroke volume), diastasis (10 %), atrial kick (20 %).
    """
    phase = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
    stroke = 1.0 - end_systolic_fraction
    rapid_end = es_phase + 0.22
    diastasis_end = 0.80

    def ease(x: np.ndarray) -> np.ndarray:
        return (1.0 - np.cos(np.pi * np.clip(x, 0.0, 1.0))) / 2.0

    systole = 1.0 - stroke * ease(phase / es_phase)
    rapid = end_systolic_fraction + 0.70 * stroke * ease((phase - es_phase) / (rapid_end - es_phase))
    slow = end_systolic_fraction + 0.70 * stroke + 0.10 * stroke * ease((phase - rapid_end) / (diastasis_end - rapid_end))
    kick = end_systolic_fraction + 0.80 * stroke + 0.20 * stroke * ease((phase - diastasis_end) / (1.0 - diastasis_end))
    return np.select([phase < es_phase, phase < rapid_end, phase < diastasis_end], [systole, rapid, slow], kick)


def _occupancy(level: np.ndarray, scale_mm: np.ndarray | float, pixel_mm: float) -> np.ndarray:
    """Soft inside-fraction of an implicit shape ``level <= 1`` (partial-volume edges about one pixel wide)."""
    distance = (level - 1.0) * scale_mm  # approximate signed distance (mm)
    return np.clip(0.5 - distance / pixel_mm, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    return field_ / (field_.std() + 1e-6)


def _default_direction(rng: np.random.Generator) -> np.ndarray:
    """An oblique SAX orientation like a scanner's (LPS), varied a little by seed."""
    angles = np.radians([-40.0 + rng.uniform(-8, 8), 30.0 + rng.uniform(-8, 8), 120.0 + rng.uniform(-10, 10)])
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def make_phantom(seed: int = 0, config: PhantomConfig = PhantomConfig()) -> Phantom:
    """Generate one subject: deterministic for ``(seed, config)``."""
    rng = np.random.default_rng(seed)
    cfg = config
    n, pix = cfg.matrix, cfg.pixel_spacing_mm
    dz = cfg.slice_spacing_mm / cfg.dense_factor
    half_thickness = cfg.slice_thickness_mm / 2.0
    margin = int(np.ceil(half_thickness / dz - 1e-9))  # dense slices beyond the outer acquired slices
    n_dense = (cfg.n_slices - 1) * cfg.dense_factor + 1 + 2 * margin
    sparse_to_dense = margin + cfg.dense_factor * np.arange(cfg.n_slices)

    # ---- anatomy (mm), varied by seed
    a0 = rng.uniform(22.0, 30.0)  # LV cavity radius at end-diastole
    c0 = rng.uniform(62.0, 76.0)  # LV cavity length (base to apex)
    wall = rng.uniform(7.0, 11.0)  # LV wall thickness at end-diastole
    apical_wall = wall * 0.8
    ef = rng.uniform(0.45, 0.70)
    rv_ef = rng.uniform(0.40, 0.60)
    descent = rng.uniform(6.0, 13.0)  # systolic base descent
    rv_angle = np.radians(rng.uniform(150.0, 200.0))  # RV side, in-plane
    rv_radius_tangential = rng.uniform(1.2, 1.5) * (a0 + wall)
    rv_radius_radial = rng.uniform(0.55, 0.75) * (a0 + wall)
    rv_length = rng.uniform(0.75, 0.9) * c0
    heart_rate = rng.uniform(55.0, 85.0)
    es_phase = rng.uniform(0.32, 0.40)
    centre_offset = rng.uniform(-6.0, 6.0, size=2)
    cycle_ms = 60000.0 / heart_rate

    # The acquired slices run from below the apex to above the base.
    z_first = -(c0 + apical_wall) - rng.uniform(-2.0, 6.0)
    z_dense = z_first - margin * dz + dz * np.arange(n_dense)
    w_base0 = z_first + (cfg.n_slices - 1) * cfg.slice_spacing_mm - rng.uniform(8.0, 16.0)

    # In-plane coordinates (mm) relative to the LV axis.
    coords = (np.arange(n) - (n - 1) / 2.0) * pix
    u = (coords[None, None, :] - centre_offset[0]).astype(np.float32)  # x
    v = (coords[None, :, None] - centre_offset[1]).astype(np.float32)  # y
    w = z_dense[:, None, None].astype(np.float32)
    radius = np.sqrt(u**2 + v**2)

    # RV frame: centre beside the septum, tangential/radial axes.
    rv_centre_distance = 0.55 * (a0 + wall) + 0.6 * rv_radius_radial
    rv_cu, rv_cv = rv_centre_distance * np.cos(rv_angle), rv_centre_distance * np.sin(rv_angle)
    ru = (u - rv_cu) * np.cos(rv_angle) + (v - rv_cv) * np.sin(rv_angle)  # radial
    rt = -(u - rv_cu) * np.sin(rv_angle) + (v - rv_cv) * np.cos(rv_angle)  # tangential

    # ---- static surroundings
    body_level = (u / 150.0) ** 2 + ((v + 10.0) / 105.0) ** 2
    lung_a = ((u - 75.0) / 38.0) ** 2 + ((v + 5.0) / 55.0) ** 2
    lung_b = ((u + 80.0) / 36.0) ** 2 + ((v + 5.0) / 52.0) ** 2
    texture = _smooth_noise(rng, (n_dense, n, n), (3.0 / dz, 2.0, 2.0))
    fine_texture = _smooth_noise(rng, (n_dense, n, n), (0.7 / dz, 0.7, 0.7))
    tissue = 0.32 + 0.07 * texture + 0.03 * fine_texture
    tissue = tissue * _occupancy(body_level, 100.0, pix) + 0.0
    lungs = np.maximum(_occupancy(lung_a, 40.0, pix), _occupancy(lung_b, 40.0, pix))
    tissue = tissue * (1.0 - lungs) + 0.05 * lungs
    fat_angle_field = _smooth_noise(rng, (1, n, n), (0.0, 6.0, 6.0))
    shading_direction = rng.normal(size=2)
    shading_direction /= np.linalg.norm(shading_direction)
    shading = 1.0 + 0.25 * (u * shading_direction[0] + v * shading_direction[1]) / (n * pix / 2.0)
    shading = shading + 0.05 * np.cos(w / 60.0)

    myo_volume_factor = (a0 + wall) ** 2 * (c0 + apical_wall) - a0**2 * c0
    phases = np.arange(cfg.n_frames) / cfg.n_frames
    lv_curve = volume_curve(phases, 1.0 - ef, es_phase)
    rv_curve = volume_curve(phases, 1.0 - rv_ef, es_phase + 0.02)

    images = np.empty((cfg.n_frames, n_dense, n, n), dtype=np.float32)
    labels = np.empty((cfg.n_frames, n_dense, n, n), dtype=np.float32)
    for frame in range(cfg.n_frames):
        rel_volume = lv_curve[frame]
        drop = descent * (1.0 - rel_volume) / ef
        c = c0 - drop
        w_base = w_base0 - drop
        a = a0 * np.sqrt(rel_volume * c0 / c)
        c_epi = c + apical_wall
        a_epi = np.sqrt((myo_volume_factor + a**2 * c) / c_epi)
        below_base = np.clip(0.5 - (w - w_base) / dz, 0.0, 1.0)  # soft basal plane
        dw = w - w_base
        lv_endo_level = np.sqrt((radius / a) ** 2 + (dw / c) ** 2)
        lv_epi_level = np.sqrt((radius / a_epi) ** 2 + (dw / c_epi) ** 2)
        endo = _occupancy(lv_endo_level, a, pix) * below_base
        epi = _occupancy(lv_epi_level, a_epi, pix) * below_base

        rv_scale = np.sqrt(rv_curve[frame])
        rv_ra, rv_ta = rv_radius_radial * rv_scale, rv_radius_tangential * rv_scale
        rv_c = rv_length
        rv_level = np.sqrt((ru / rv_ra) ** 2 + (rt / rv_ta) ** 2 + (dw / rv_c) ** 2)
        rv_wall_level = np.sqrt((ru / (rv_ra + 3.5)) ** 2 + (rt / (rv_ta + 3.5)) ** 2 + (dw / (rv_c + 3.5)) ** 2)
        septum_level = np.sqrt((radius / (a_epi + 1.5)) ** 2 + (dw / (c_epi + 1.5)) ** 2)
        outside_septum = 1.0 - _occupancy(septum_level, a_epi, pix)
        rv_cavity = _occupancy(rv_level, rv_ra, pix) * outside_septum * below_base
        rv_wall = _occupancy(rv_wall_level, rv_ra + 3.5, pix) * below_base

        fat_level = np.sqrt((radius / (a_epi + 4.0)) ** 2 + (dw / (c_epi + 4.0)) ** 2)
        fat = _occupancy(fat_level, a_epi + 4.0, pix) * (fat_angle_field > 0.4) * below_base
        atrium_level = np.sqrt((radius / (0.75 * a0)) ** 2 + ((w - w_base - 22.0) / 24.0) ** 2)
        atrium = _occupancy(atrium_level, 0.75 * a0, pix) * (1.0 - below_base)

        image = tissue.copy()
        for occupancy, value in (
            (fat, 0.85),
            (np.maximum(epi, rv_wall), 0.27),
            (rv_cavity, 0.92),
            (endo, 1.0),
            (atrium, 0.95),
        ):
            image = image * (1.0 - occupancy) + value * occupancy
        image *= 1.0 + 0.04 * fine_texture * np.maximum(epi - endo, 0.0)  # myocardial texture
        image *= shading
        noise_real = rng.standard_normal(image.shape).astype(np.float32)
        noise_imag = rng.standard_normal(image.shape).astype(np.float32)
        image = np.sqrt((image + cfg.noise_sigma * noise_real) ** 2 + (cfg.noise_sigma * noise_imag) ** 2)
        images[frame] = image * BLOOD_INTENSITY

        label = np.zeros(image.shape, dtype=np.float32)
        label[(rv_cavity >= 0.5) & (endo < 0.5) & (epi < 0.5)] = RV_CAVITY
        label[(epi >= 0.5) & (endo < 0.5)] = LV_MYOCARDIUM
        label[endo >= 0.5] = LV_CAVITY
        labels[frame] = label

    direction = np.asarray(cfg.direction, dtype=np.float64) if cfg.direction is not None else _default_direction(rng)
    frame_times = phases * cycle_ms
    centre_lps = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-20, 20)])
    # Origin: voxel (0, 0, 0) of the dense stack, placed so that the in-plane centre is at centre_lps.
    origin = centre_lps - direction @ np.array([(n - 1) / 2.0 * pix, (n - 1) / 2.0 * pix, 0.0]) + direction[:, 2] * z_dense[0]
    description = {
        "subject": f"phantom{seed:04d}",
        "phantom_seed": seed,
        "description": "CaLID synthetic cine phantom",
    }
    dense = CineStack(
        data=images,
        spacing=(pix, pix, dz),
        origin=tuple(origin),
        direction=direction,
        frame_times_ms=frame_times,
        metadata={**description, "kind": "dense truth", "dense_factor": cfg.dense_factor, "source_dtype": "int16"},
        source=f"phantom(seed={seed})",
    )
    dense_labels = dense.with_data(labels, metadata={**dense.metadata, "kind": "dense labels", "source_dtype": "uint8", "labels": LABEL_NAMES})

    weights = slice_profile_weights(dz, cfg.slice_thickness_mm)
    sparse_data = np.stack(
        [np.tensordot(images[:, k - margin : k + margin + 1], weights, axes=([1], [0])) for k in sparse_to_dense], axis=1
    ).astype(np.float32)
    # Written to disk as int16 like a magnitude image from a scanner (in memory: float32).
    sparse_meta = {**description, "kind": "sparse acquisition", "slice_thickness_mm": cfg.slice_thickness_mm, "source_dtype": "int16"}
    sparse = CineStack(
        data=sparse_data,
        spacing=(pix, pix, cfg.slice_spacing_mm),
        origin=tuple(dense.slice_origin(int(sparse_to_dense[0]))),
        direction=direction,
        frame_times_ms=frame_times,
        metadata=sparse_meta,
        source=f"phantom(seed={seed})",
    )
    sparse_labels = sparse.with_data(labels[:, sparse_to_dense], metadata={**sparse_meta, "kind": "sparse labels", "source_dtype": "uint8", "labels": LABEL_NAMES})
    return Phantom(
        dense=dense,
        dense_labels=dense_labels,
        sparse=sparse,
        sparse_labels=sparse_labels,
        sparse_to_dense_index=sparse_to_dense,
        lv_volume_curve=lv_curve,
        es_frame=int(np.argmin(lv_curve)),
        anatomy={
            "lv_radius_mm": a0,
            "lv_length_mm": c0,
            "wall_mm": wall,
            "ejection_fraction": ef,
            "rv_ejection_fraction": rv_ef,
            "heart_rate_bpm": heart_rate,
            "base_descent_mm": descent,
        },
    )


def slice_profile_weights(dense_spacing_mm: float, thickness_mm: float) -> np.ndarray:
    """Weights of the dense slices around a slice centre for a box profile of ``thickness_mm``.

    Dense slice j (offset j * dense_spacing from the centre) stands for the
    interval of its own width; its weight is the part of that interval inside
    the box, so the weights sum to one.
    """
    margin = int(np.ceil(thickness_mm / 2.0 / dense_spacing_mm - 1e-9))
    offsets = dense_spacing_mm * np.arange(-margin, margin + 1)
    lower = np.maximum(offsets - dense_spacing_mm / 2.0, -thickness_mm / 2.0)
    upper = np.minimum(offsets + dense_spacing_mm / 2.0, thickness_mm / 2.0)
    weights = np.clip(upper - lower, 0.0, None)
    return (weights / weights.sum()).astype(np.float64)
