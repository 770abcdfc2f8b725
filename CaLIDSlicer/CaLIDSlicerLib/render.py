"""Offscreen snapshots of what the module shows: a slice view on a plane (MRML slice logic, no GUI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import slicer
import vtk

from calid.atomic import atomic_path

from CaLIDSlicerLib import mrml


def render_slice_view(
    scene: Any,
    application_logic: Any,
    volume_node: Any,
    plane: Any,
    path: str | os.PathLike[str],
    size: tuple[int, int] = (256, 256),
    field_of_view_mm: float = 200.0,
    name: str = "",
) -> Path:
    """Composite the volume on ``plane`` (a calid Plane, LPS) the way a slice view does, and write a PNG.

    Uses Slicer's own slice logic (reslicing, window / level, colour table), so the
    picture is what the red / yellow / green view shows for that plane.
    """
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(application_logic)
    logic.SetMRMLScene(scene)
    slice_node = logic.AddSliceNode(name or f"CaLIDSnapshot{scene.GetNumberOfNodesByClass('vtkMRMLSliceNode')}")
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
    logic.ResizeSliceNode(size[0], size[1])  # what a view widget does when it is resized
    slice_node.SetFieldOfView(field_of_view_mm, field_of_view_mm * size[1] / size[0], 1.0)
    mrml.orient_slice_node(slice_node, plane)
    # Scene logics may reset a new slice node to the default size; insist on ours.
    slice_node.SetDimensions(size[0], size[1], 1)
    slice_node.UpdateMatrices()
    port = logic.GetImageDataConnection()
    port.GetProducer().Update()
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputConnection(port)
        writer.Write()
    logic.SetMRMLScene(None)
    return path
