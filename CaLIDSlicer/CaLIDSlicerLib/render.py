"""Offscreen snapshots of what the module shows: a slice view on a plane (MRML slice logic, no GUI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import slicer
import vtk

from calid.atomic import atomic_path
from calid.geometry.surfaces import write_window_png

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
    mrml.orient_slice_node(slice_node, plane, volume_node.GetParentTransformNode())  # planes are in the volume's own coordinates
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


#: Camera direction (RAS, from the focal point to the camera) and view-up of the named 3D views.
THREE_D_VIEWS = {
    "anterior": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "left": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "inferior": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
}
_THREE_D_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLModelDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager3D",
)


def render_three_d_view(
    scene: Any,
    application_logic: Any,
    path: str | os.PathLike[str],
    size: tuple[int, int] = (400, 400),
    direction: str = "anterior",
) -> Path:
    """Render the scene's 3D content (segmentation surfaces, models) the way a 3D view does, and write a PNG.

    Slicer's own 3D displayable managers build the actors from the display
    nodes, so colours, opacity and visibility are those the 3D view shows.
    """
    if direction not in THREE_D_VIEWS:
        raise ValueError(f"direction must be one of {', '.join(THREE_D_VIEWS)}, got {direction!r}")
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    # The displayable managers expect an interactor; a generic one needs no display.
    interactor = vtk.vtkGenericRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    view = scene.AddNewNodeByClass("vtkMRMLViewNode")
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(application_logic)
    for name in _THREE_D_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = factory.InstantiateDisplayableManagers(renderer)
    try:
        group.SetMRMLDisplayableNode(view)
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        (dx, dy, dz), up = THREE_D_VIEWS[direction]
        fx, fy, fz = camera.GetFocalPoint()
        distance = camera.GetDistance()
        camera.SetPosition(fx + dx * distance, fy + dy * distance, fz + dz * distance)
        camera.SetViewUp(*up)
        renderer.ResetCamera()
        window.Render()
        path = write_window_png(window, path)
    finally:
        group.SetMRMLDisplayableNode(None)
        scene.RemoveNode(view)
        window.Finalize()
    return path
