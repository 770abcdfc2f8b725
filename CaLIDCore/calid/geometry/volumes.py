"""Clinical volumes from label stacks: LV / RV cavity volumes, myocardial mass, EDV, ESV, SV, EF.

Volumes are discs summation: every slice contributes its labelled area times
the distance it represents along the normal. For an acquired stack that is
Simpson's method of the clinical routine (area x slice spacing). A dense
stack made by CaLID covers the same slab: its outer slices also stand for the
half acquisition slab beyond the first and last acquired slice centres, so
they are weighted by that extra half-spacing; the two methods then measure
the same region and differ only by how the shape between slices is known.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calid.atomic import atomic_path
from calid.evaluation.figures import save_figure
from calid.data.stack import CineStack
from calid.errors import InputError
from calid.segmentation.model import LV_CAVITY, LV_MYOCARDIUM, RV_CAVITY

MYOCARDIAL_DENSITY_G_PER_ML = 1.05


def slice_weights_mm(labels: CineStack, acquired_slice_spacing_mm: float | None = None) -> np.ndarray:
    """Thickness (mm) each slice stands for along the normal (see the module docstring).

    ``acquired_slice_spacing_mm``: for a dense stack, the spacing of the acquired slices it was made
    from; by default taken from the stack's upsampling record (kept in the files CaLID writes)."""
    weights = np.full(labels.n_slices, labels.slice_spacing)
    acquired_spacing = acquired_slice_spacing_mm
    if acquired_spacing is None:
        acquired_spacing = labels.recorded_acquired_spacing()
    if acquired_spacing is not None and not float(acquired_spacing) >= labels.slice_spacing * (1 - 1e-6):
        source = "--acquired-slice-spacing" if acquired_slice_spacing_mm is not None else labels.source
        raise InputError(
            source, f"acquired slice spacing {float(acquired_spacing):g} mm is below the stack's own {labels.slice_spacing:g} mm: a dense stack is made from slices further apart"
        )
    if acquired_spacing is not None and labels.n_slices > 1:
        extra = (float(acquired_spacing) - labels.slice_spacing) / 2.0
        weights[0] += extra
        weights[-1] += extra
    return weights


def structure_volumes_ml(labels: CineStack, value: int, acquired_slice_spacing_mm: float | None = None) -> np.ndarray:
    """Volume (ml) of one label value in every frame."""
    pixel_area = labels.spacing[0] * labels.spacing[1]
    areas = (np.rint(labels.data) == value).sum(axis=(2, 3)) * pixel_area  # (T, Z) mm^2
    return (areas @ slice_weights_mm(labels, acquired_slice_spacing_mm)) / 1000.0


@dataclass
class CardiacFunction:
    """Per-frame volumes and the cine's summary numbers."""

    lv_volume_ml: np.ndarray
    rv_volume_ml: np.ndarray
    lv_myocardium_ml: np.ndarray
    ed_frame: int
    es_frame: int
    frame_times_ms: np.ndarray | None = None
    method: str = ""
    summary: dict[str, float] = field(default_factory=dict)
    #: The RV's own end-diastole and end-systole (largest / smallest RV cavity), which may differ from the LV's.
    rv_ed_frame: int | None = None
    rv_es_frame: int | None = None
    #: What makes the numbers less than trustworthy: a file without geometry, frames without an LV, one frame.
    warnings: list[str] = field(default_factory=list)
    #: Which frames of the acquired cine these are (a selection, e.g. ED and ES of calid upsample
    #: --frames), as calid's files record them; None: no record says.
    cine_frames: list[int] | None = None

    def _phase(self, t: int) -> str:
        phases = ["ED" if t == self.ed_frame else "ES" if t == self.es_frame else ""]
        if self.rv_ed_frame is not None and self.rv_ed_frame != self.ed_frame and t == self.rv_ed_frame:
            phases.append("RV ED")
        if self.rv_es_frame is not None and self.rv_es_frame != self.es_frame and t == self.rv_es_frame:
            phases.append("RV ES")
        return ", ".join(p for p in phases if p)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "frame": t,
                "cine_frame": "" if self.cine_frames is None else self.cine_frames[t],  # blank: no record says which
                "time_ms": "" if self.frame_times_ms is None else round(float(self.frame_times_ms[t]), 2),
                "lv_cavity_ml": round(float(self.lv_volume_ml[t]), 3),
                "rv_cavity_ml": round(float(self.rv_volume_ml[t]), 3),
                "lv_myocardium_ml": round(float(self.lv_myocardium_ml[t]), 3),
                "lv_mass_g": round(float(self.lv_myocardium_ml[t]) * MYOCARDIAL_DENSITY_G_PER_ML, 3),
                "phase": self._phase(t),
            }
            for t in range(len(self.lv_volume_ml))
        ]


def cardiac_function(
    labels: CineStack, ed_frame: int | None = None, es_frame: int | None = None, method: str = "", acquired_slice_spacing_mm: float | None = None
) -> CardiacFunction:
    """Volumes per frame and EDV, ESV, SV, EF (LV and RV) and LV mass at ED.

    ED / ES default to the frames of largest / smallest cavity volume, for each ventricle on its
    own (the RV's end-systole may differ from the LV's); frames without any LV cavity (a failed
    segmentation) are left out of that choice. Given frames apply to both ventricles.
    ``acquired_slice_spacing_mm``: see :func:`slice_weights_mm`.
    """
    lv = structure_volumes_ml(labels, LV_CAVITY, acquired_slice_spacing_mm)
    if not lv.any():
        raise InputError(labels.source, f"no LV cavity (label {LV_CAVITY}) in any frame: the volumes cannot be computed")
    rv = structure_volumes_ml(labels, RV_CAVITY, acquired_slice_spacing_mm)
    myo = structure_volumes_ml(labels, LV_MYOCARDIUM, acquired_slice_spacing_mm)
    warnings: list[str] = []
    if labels.has_placeholder_spacing or labels.made_from_placeholder_spacing:
        how = "all spacings exactly 1 mm" if labels.has_placeholder_spacing else "upsampled from a stack whose spacings were all exactly 1 mm"
        warnings.append(
            f"{labels.source} carries no geometry ({how}): the volumes and mass are in voxels, not ml; "
            "only the ejection fractions are meaningful. Use labels saved with the image's geometry"
        )
    usable = lv > 0
    if not usable.all():
        missing = ", ".join(str(t) for t in np.flatnonzero(~usable))
        warnings.append(f"frame(s) {missing} have no LV cavity (a failed segmentation?) and were not considered for end-diastole or end-systole")
    frames = np.flatnonzero(usable)
    ed = int(frames[np.argmax(lv[frames])]) if ed_frame is None else int(ed_frame)
    es = int(frames[np.argmin(lv[frames])]) if es_frame is None else int(es_frame)
    for name, frame in (("ED", ed), ("ES", es)):
        if not 0 <= frame < labels.n_frames:
            raise InputError(labels.source, f"{name} frame {frame} does not exist: the file has {labels.n_frames} frame(s), 0 to {labels.n_frames - 1} (positions in the file)")
    rv_ed, rv_es = ed, es
    rv_frames = frames[rv[frames] > 0]  # a frame without RV cavity (a failed segmentation) is no RV end-systole at 0 ml
    if ed_frame is None and es_frame is None and rv_frames.size:
        rv_ed, rv_es = int(rv_frames[np.argmax(rv[rv_frames])]), int(rv_frames[np.argmin(rv[rv_frames])])
        if rv_frames.size < frames.size:
            missing = ", ".join(str(t) for t in sorted(set(frames.tolist()) - set(rv_frames.tolist())))
            warnings.append(f"frame(s) {missing} have no RV cavity (a failed segmentation?) and were not considered for the RV's end-diastole or end-systole")
    one_phase = ed == es
    if one_phase:
        warnings.append("end-diastole and end-systole are the same frame (one frame given?): no stroke volume or ejection fraction")

    def ejection(volumes: np.ndarray, diastole: int, systole: int) -> tuple[float, float]:
        if one_phase or not volumes[diastole] > 0:
            return float("nan"), float("nan")
        stroke = float(volumes[diastole] - volumes[systole])
        return stroke, 100.0 * stroke / float(volumes[diastole])

    lv_sv, lv_ef = ejection(lv, ed, es)
    rv_sv, rv_ef = ejection(rv, rv_ed, rv_es)
    summary = {
        "lv_edv_ml": float(lv[ed]),
        "lv_esv_ml": float(lv[es]),
        "lv_sv_ml": lv_sv,
        "lv_ef_percent": lv_ef,
        "rv_edv_ml": float(rv[rv_ed]),
        "rv_esv_ml": float(rv[rv_es]),
        "rv_sv_ml": rv_sv,
        "rv_ef_percent": rv_ef,
        "lv_mass_ed_g": float(myo[ed] * MYOCARDIAL_DENSITY_G_PER_ML),
    }
    return CardiacFunction(lv, rv, myo, ed, es, labels.frame_times_ms, method, summary, rv_ed, rv_es, warnings, labels.recorded_frames())


def write_function_csv(results: dict[str, CardiacFunction], path: str | os.PathLike[str]) -> Path:
    """One CSV: a row per (method, frame), then the summary rows (frame = 'summary')."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    for method, result in results.items():
        rows += [{"method": method, **row} for row in result.rows()]
    fields = ["method", "frame", "cine_frame", "time_ms", "lv_cavity_ml", "rv_cavity_ml", "lv_myocardium_ml", "lv_mass_g", "phase"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            handle.write("\n")
            summary = csv.writer(handle)
            summary.writerow(["method", *next(iter(results.values())).summary.keys()])
            for method, result in results.items():
                summary.writerow([method, *(f"{v:.3f}" for v in result.summary.values())])
    return path


def plot_volume_curves(results: dict[str, CardiacFunction], path: str | os.PathLike[str]) -> Path:
    """LV and RV cavity volume over the cycle for each method (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 3.8))
    in_ms = all(result.frame_times_ms is not None for result in results.values())  # one x axis: times only if every method has them
    # Else the cine's frame numbers where every file records them (selections of other frames line up), else positions.
    in_cine_frames = not in_ms and all(result.cine_frames is not None for result in results.values())
    for (method, result), style in zip(results.items(), ("-", "--", ":", "-.")):
        x = np.arange(len(result.lv_volume_ml))
        if in_ms and result.frame_times_ms is not None:
            x = result.frame_times_ms
        elif in_cine_frames and result.cine_frames is not None:
            x = np.asarray(result.cine_frames)
        s = result.summary
        axis.plot(x, result.lv_volume_ml, style, color="tab:blue", label=f"LV, {method} (EF {s['lv_ef_percent']:.0f} %)")
        axis.plot(x, result.rv_volume_ml, style, color="tab:red", label=f"RV, {method} (EF {s['rv_ef_percent']:.0f} %)")
    axis.set_xlabel("time (ms)" if in_ms else "frame of the cine" if in_cine_frames else "frame")
    if not in_ms:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # frames are whole: no tick at 0.2
    axis.set_ylabel("cavity volume (ml)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)
