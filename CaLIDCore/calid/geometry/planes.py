"""Long-axis planes in physical coordinates (LPS millimetres, like every CineStack).

A :class:`Plane` is a centre, a unit normal and an in-plane axis ``u``
(``v = normal x u`` completes a right-handed frame). The standard cardiac
views come from a segmentation:

* the LV long axis: a line fitted (least squares) through the LV cavity
  centroids of the slices of one frame, pointing from base to apex;
* 4-chamber: contains the LV axis and passes through the RV cavity centroid;
* 2-chamber: contains the LV axis, perpendicular to the 4-chamber plane;
* 3-chamber: contains the LV axis, through a given point (e.g. the aortic
  valve) or rotated from the 4-chamber plane by a given angle about the axis.

In every long-axis plane ``v`` (the image rows) runs along the LV axis from
the apex to the base, so every resliced view shows the apex at the top and
the base at the bottom, like the long-axis cines of the scanner.
Planes can also be given directly (centre, normal, u) or by three points,
which is what the Slicer module feeds from markups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calid.data.stack import CineStack
from calid.errors import InputError
from calid.segmentation.model import LV_CAVITY, RV_CAVITY

#: Default angle (degrees) of the 3-chamber plane from the 4-chamber plane about the LV axis:
#: from the RV (septal) direction towards ``axis x septal``, which with the axis pointing base to
#: apex is the inferior side. The plane then also runs 55 degrees from the septum towards the
#: anterior wall, cutting the anteroseptal and inferolateral walls as the 3-chamber view does.
#: Typical anatomy puts the LV outflow tract 110-140 degrees round; give a point when one is known.
THREE_CHAMBER_ANGLE_DEG = 125.0
#: Least RV cavity (ml) that places the 4-chamber plane; even an end-systolic RV holds tens of ml.
MIN_RV_ML = 1.0


def _unit(vector: np.ndarray, what: str, problem: str = "has no direction (zero length, or points that are collinear or coincide)") -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-9:
        raise InputError(what, problem)
    return vector / norm


#: What every ``planes.json`` says of its coordinates.
PLANES_COORDINATES = "LPS mm (RAS in the *_ras entries)"


@dataclass(frozen=True)
class Plane:
    """A plane with an in-plane frame: points ``centre + a * u + b * v``."""

    name: str
    centre: np.ndarray
    normal: np.ndarray
    u: np.ndarray

    def __post_init__(self) -> None:
        normal = _unit(self.normal, f"plane {self.name}: normal")
        u = np.asarray(self.u, dtype=np.float64)
        if np.linalg.norm(u) > 1e-9 and np.linalg.norm(u - np.dot(u, normal) * normal) < 1e-9 * np.linalg.norm(u):
            raise InputError(f"plane {self.name}", "the in-plane axis is parallel to the normal: give an axis that lies in the plane")
        u = _unit(u - np.dot(u, normal) * normal, f"plane {self.name}: in-plane axis")  # project into the plane
        object.__setattr__(self, "centre", np.asarray(self.centre, dtype=np.float64).reshape(3))
        object.__setattr__(self, "normal", normal)
        object.__setattr__(self, "u", u)

    @property
    def v(self) -> np.ndarray:
        return np.cross(self.normal, self.u)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of LPS points ``(..., 3)`` from the plane."""
        return (np.asarray(points, dtype=np.float64) - self.centre) @ self.normal

    @classmethod
    def from_points(cls, name: str, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> Plane:
        """The plane through three points, centred on ``a``, shown as the automatic long-axis planes
        are: the line from ``a`` towards ``b`` (the apex) runs up the image (``v`` from ``b`` to
        ``a``), and ``c`` lies on the right (``u``)."""
        a, b, c = (np.asarray(p, dtype=np.float64) for p in (a, b, c))
        towards_b = _unit(b - a, f"plane {name} from points", "the first two points coincide: they give no long-axis direction")
        across = _unit((c - a) - np.dot(c - a, towards_b) * towards_b, f"plane {name} from points",
                       "the third point lies on the line through the first two: the three points give no plane")
        return cls(name, a, np.cross(towards_b, across), across)

    def to_record(self) -> dict[str, list[float]]:
        """The plane as ``planes.json`` files hold it: ``centre``, ``normal``, ``u``, ``v`` in LPS mm (calid's
        coordinates, as in ITK), and each also in RAS (Slicer's) under ``*_ras``."""
        lps = {"centre": self.centre.tolist(), "normal": self.normal.tolist(), "u": self.u.tolist(), "v": self.v.tolist()}
        return {**lps, **{f"{k}_ras": v for k, v in self.to_ras().items()}}

    def to_ras(self) -> dict[str, list[float]]:
        """Centre, normal and axes in RAS (what Slicer's ``SetSliceToRASByNTP`` takes)."""
        flip = np.array([-1.0, -1.0, 1.0])
        return {"centre": (self.centre * flip).tolist(), "normal": (self.normal * flip).tolist(), "u": (self.u * flip).tolist(), "v": (self.v * flip).tolist()}


@dataclass(frozen=True)
class LongAxis:
    """The LV long axis: a point on it, the direction base -> apex, and the fitted centroids."""

    point: np.ndarray
    direction: np.ndarray
    centroids: np.ndarray  # (N, 3) LV cavity centroid of every slice that has one


def structure_centroid(labels: CineStack, value: int, frame: int = 0) -> np.ndarray:
    """LPS centroid of one label value in one frame."""
    z, y, x = np.nonzero(np.rint(labels.data[frame]) == value)
    if z.size == 0:
        raise InputError(labels.source, f"no voxel of label {value} in frame {frame}")
    return labels.index_to_physical(np.stack([x, y, z], axis=1).mean(axis=0))


def lv_long_axis(labels: CineStack, frame: int = 0) -> LongAxis:
    """The line through the LV cavity centroids of the slices of one frame (least squares).

    Needs the LV cavity in at least two slices. The direction points from base to apex: towards
    the end of the axis with less of the cavity's area, which holds even when the most basal
    slice, cut through the outflow tract or valve plane, is the smallest one.
    """
    volume = np.rint(labels.data[frame])
    centroids, areas = [], []
    for z in range(volume.shape[0]):
        ys, xs = np.nonzero(volume[z] == LV_CAVITY)
        if ys.size:
            centroids.append(labels.index_to_physical([xs.mean(), ys.mean(), z]))
            areas.append(ys.size)
    if len(centroids) < 2:
        raise InputError(
            labels.source,
            f"the LV cavity (label {LV_CAVITY}) was found in {len(centroids)} slice(s) of frame {frame}; the long axis needs at least 2. "
            "Check the segmentation, or give the planes by points",
        )
    points = np.asarray(centroids)
    centre = points.mean(axis=0)
    _, _, vt = np.linalg.svd(points - centre)
    direction = vt[0]
    # The slice normal is a far better axis guess than two noisy centroids: keep the fitted
    # line within the half-space of the stack normal, then orient base -> apex.
    if np.dot(direction, labels.slice_normal) < 0:
        direction = -direction
    # The cavity's area-weighted centre along the axis lies on the base side of the middle of its extent.
    along = (points - centre) @ direction
    weighted = float(np.average(along, weights=np.asarray(areas, dtype=np.float64)))
    if weighted > 0.5 * (along.min() + along.max()):
        direction = -direction
    return LongAxis(point=centre, direction=_unit(direction, "LV long axis"), centroids=points)


def standard_planes(
    labels: CineStack,
    frame: int = 0,
    three_chamber_point: np.ndarray | None = None,
    three_chamber_angle_deg: float = THREE_CHAMBER_ANGLE_DEG,
) -> dict[str, Plane]:
    """The 4-, 2- and 3-chamber planes (and the mid short-axis plane) from a label stack.

    All long-axis planes contain the fitted LV axis and are centred on it.
    The 2-chamber normal points towards the RV; the 4-chamber ``v`` too.
    """
    axis = lv_long_axis(labels, frame)
    rv_ml = float((np.rint(labels.data[frame]) == RV_CAVITY).sum() * np.prod(labels.spacing) / 1000.0)
    if rv_ml < MIN_RV_ML:  # a few stray voxels would swing the 4-chamber plane anywhere
        raise InputError(
            labels.source,
            f"{'no' if rv_ml == 0 else f'only {rv_ml:.2f} ml of'} RV cavity (label {RV_CAVITY}) in frame {frame}: the 4-chamber plane cannot be placed; give the planes by points",
        )
    rv = structure_centroid(labels, RV_CAVITY, frame)
    to_rv = rv - axis.point
    to_rv = to_rv - np.dot(to_rv, axis.direction) * axis.direction  # perpendicular to the axis
    septal = _unit(to_rv, "direction from the LV axis to the RV centroid")
    # In every long-axis view the rows run from the apex (top) to the base (bottom): v = -axis.
    four = Plane("4-chamber", axis.point, np.cross(axis.direction, septal), septal)
    two = Plane("2-chamber", axis.point, septal, -np.cross(axis.direction, septal))
    if three_chamber_point is not None:
        towards = np.asarray(three_chamber_point, dtype=np.float64) - axis.point
        towards = towards - np.dot(towards, axis.direction) * axis.direction
        in_plane = _unit(towards, "direction from the LV axis to the 3-chamber point")
    else:
        angle = np.deg2rad(three_chamber_angle_deg)
        in_plane = np.cos(angle) * septal + np.sin(angle) * np.cross(axis.direction, septal)
    three = Plane("3-chamber", axis.point, np.cross(axis.direction, in_plane), in_plane)
    short = Plane("mid short-axis", axis.point, axis.direction, septal)
    return {"4-chamber": four, "2-chamber": two, "3-chamber": three, "short-axis": short}
