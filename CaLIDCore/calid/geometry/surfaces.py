"""Closed, smooth surfaces of labelled structures (VTK), in the image's physical coordinates.

Surfaces come from VTK's discrete flying edges on the label volume of one
frame (padded by one empty voxel so that every surface closes), smoothed by
the windowed-sinc filter (which keeps the volume), and mapped from voxel
indices to LPS millimetres with the stack's own index-to-physical matrix:
a surface lies exactly on its voxels in Slicer, ITK-SNAP or ParaView.

Files: ``.vtp`` (VTK XML), ``.stl`` and ``.obj``. Coordinates are LPS, the
convention Slicer assumes for STL / OBJ files.
"""

from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from calid.atomic import atomic_path
from calid.data.stack import CineStack
from calid.errors import InputError, OutputError


def label_surface(labels: CineStack, value: int, frame: int = 0, smoothing_iterations: int = 20, pass_band: float = 0.05) -> vtk.vtkPolyData:
    """The closed surface of one label value in one frame, in LPS mm (empty when the label is absent)."""
    volume = (np.rint(labels.data[frame]) == value).astype(np.uint8)
    if not volume.any():
        return vtk.vtkPolyData()
    padded = np.pad(volume, 1)
    image = vtk.vtkImageData()
    image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])  # x, y, z
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(padded.ravel(order="C"), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    contour = vtk.vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 1)
    contour.ComputeNormalsOff()
    smoother = vtk.vtkWindowedSincPolyDataFilter()
    smoother.SetInputConnection(contour.GetOutputPort())
    smoother.SetNumberOfIterations(smoothing_iterations)
    smoother.SetPassBand(pass_band)
    smoother.BoundarySmoothingOff()
    smoother.FeatureEdgeSmoothingOff()
    smoother.NonManifoldSmoothingOn()
    smoother.NormalizeCoordinatesOn()
    # Padding shifted indices by one voxel; the stack's matrix takes indices to LPS.
    matrix = labels.index_to_physical_matrix @ np.array([[1, 0, 0, -1], [0, 1, 0, -1], [0, 0, 1, -1], [0, 0, 0, 1]], dtype=np.float64)
    transform = vtk.vtkTransform()
    transform.SetMatrix(matrix.ravel().tolist())
    to_physical = vtk.vtkTransformPolyDataFilter()
    to_physical.SetInputConnection(smoother.GetOutputPort())
    to_physical.SetTransform(transform)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(to_physical.GetOutputPort())
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def surface_points(surface: vtk.vtkPolyData) -> np.ndarray:
    """(N, 3) point coordinates of a surface."""
    if surface.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)


def enclosed_volume_ml(surface: vtk.vtkPolyData) -> float:
    """Volume inside a closed surface in ml (mm^3 / 1000)."""
    if surface.GetNumberOfPoints() == 0:
        return 0.0
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(surface)
    mass = vtk.vtkMassProperties()
    mass.SetInputConnection(triangles.GetOutputPort())
    mass.Update()
    return float(mass.GetVolume()) / 1000.0


def write_surface(surface: vtk.vtkPolyData, path: str | os.PathLike[str]) -> Path:
    """Write ``.vtp``, ``.stl`` or ``.obj`` atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".vtp": vtk.vtkXMLPolyDataWriter, ".stl": vtk.vtkSTLWriter, ".obj": vtk.vtkOBJWriter}
    if suffix not in writers:
        raise OutputError(path, f"unknown surface format {suffix!r}; use .vtp, .stl or .obj")
    if suffix == ".stl":
        triangles = vtk.vtkTriangleFilter()
        triangles.SetInputData(surface)
        triangles.Update()
        surface = triangles.GetOutput()
    with atomic_path(path) as tmp:
        writer = writers[suffix]()
        writer.SetFileName(str(tmp))
        writer.SetInputData(surface)
        if suffix == ".stl":
            writer.SetHeader("SPACE=LPS; CaLID surface")
        if not writer.Write():
            raise OutputError(path, "VTK could not write the surface")
    return path


def read_surface(path: str | os.PathLike[str]) -> vtk.vtkPolyData:
    """Read a surface written by :func:`write_surface`."""
    path = Path(path)
    readers = {".vtp": vtk.vtkXMLPolyDataReader, ".stl": vtk.vtkSTLReader, ".obj": vtk.vtkOBJReader}
    if path.suffix.lower() not in readers or not path.is_file():
        raise InputError(path, "not a readable surface file (.vtp, .stl, .obj)")
    reader = readers[path.suffix.lower()]()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


def render_surfaces(
    surfaces: dict[str, vtk.vtkPolyData],
    path: str | os.PathLike[str],
    size: tuple[int, int] = (640, 480),
    view_direction_lps: np.ndarray | None = None,
) -> Path:
    """An offscreen render (PNG) of coloured surfaces; uses EGL where VTK was built with it."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    colours = {"RV cavity": (0.85, 0.35, 0.35), "LV myocardium": (0.4, 0.75, 0.4), "LV cavity": (0.4, 0.55, 0.95)}
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.1, 0.1, 0.12)
    for name, surface in surfaces.items():
        if surface.GetNumberOfPoints() == 0:
            continue
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(surface)
        mapper.ScalarVisibilityOff()  # colour by structure, not by the label scalars
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colours.get(name, (0.8, 0.8, 0.8)))
        actor.GetProperty().SetOpacity(0.5 if name == "LV myocardium" else 1.0)
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    renderer.ResetCamera()
    if view_direction_lps is not None:
        camera = renderer.GetActiveCamera()
        focal = np.array(camera.GetFocalPoint())
        distance = camera.GetDistance()
        camera.SetPosition(*(focal - distance * np.asarray(view_direction_lps, dtype=np.float64) / np.linalg.norm(view_direction_lps)))
        renderer.ResetCamera()
    window.Render()
    path = write_window_png(window, path)
    window.Finalize()
    return path


def write_window_png(window: Any, path: str | os.PathLike[str]) -> Path:
    """The back buffer of a rendered (offscreen) VTK window as a PNG, written atomically."""
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.ReadFrontBufferOff()
    grabber.Update()
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputConnection(grabber.GetOutputPort())
        writer.Write()
    return path
