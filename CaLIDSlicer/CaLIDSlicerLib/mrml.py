"""MRML nodes <-> calid objects, as plain functions of an explicit scene.

Everything here works in a full Slicer and headless with the ``slicer-core``
wheel (the tests run it that way), so the module's widget stays thin.

Conventions: MRML uses RAS, ``calid.CineStack`` uses LPS; both store voxel
arrays as (slice, row, column) = (k, j, i). Frame times of a cine are the
numeric index values of a sequence, in milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import vtk

from calid.data.stack import CineStack
from calid.errors import InputError
from calid.geometry.volumes import MYOCARDIAL_DENSITY_G_PER_ML

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: Segment colours (RGB 0-1) and names of the label values.
SEGMENTS = {1: ("RV cavity", (0.85, 0.35, 0.35)), 2: ("LV myocardium", (0.40, 0.75, 0.40)), 3: ("LV cavity", (0.40, 0.55, 0.95))}


def _ijk_to_ras(stack: CineStack) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ stack.direction @ np.diag(stack.spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(stack.origin)
    return matrix


def _geometry_of(node: Any) -> dict[str, Any]:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return {"spacing": tuple(float(s) for s in spacing), "origin": tuple(ijk_to_lps[:3, 3]), "direction": ijk_to_lps[:3, :3] / spacing}


def _array_of(node: Any) -> np.ndarray:
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(node.GetName(), "the volume has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(node.GetName(), f"has {image.GetNumberOfScalarComponents()} components; a scalar (grey-level) volume is needed")
    return np.array(slicer.util.arrayFromVolume(node), copy=True)


def stack_from_volume(node: Any) -> CineStack:
    """A one-frame CineStack from a scalar volume node (geometry and voxel type kept)."""
    data = _array_of(node)
    return CineStack(data=data[None], metadata={"source_dtype": str(data.dtype), "source_node": node.GetName()}, source=node.GetName(), **_geometry_of(node))


def volume_from_stack(scene: Any, stack: CineStack, name: str, frame: int = 0, labelmap: bool = False, node: Any = None) -> Any:
    """A new (or the given) scalar / labelmap volume node with one frame of the stack, in its geometry."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    _fill_volume(node, stack, frame, labelmap)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _fill_volume(node: Any, stack: CineStack, frame: int, labelmap: bool) -> None:
    values = stack.data[frame]
    dtype = np.uint8 if labelmap else np.dtype(stack.metadata.get("source_dtype", "float32"))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(values.astype(dtype)))
    matrix = vtk.vtkMatrix4x4()
    ijk_to_ras = _ijk_to_ras(stack)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    node.SetIJKToRASMatrix(matrix)


def stack_from_sequence(sequence: Any) -> CineStack:
    """A cine from a sequence of scalar volumes (same grid in every frame); times from numeric index values."""
    count = sequence.GetNumberOfDataNodes()
    if count == 0:
        raise InputError(sequence.GetName(), "the sequence is empty")
    frames, geometry, times = [], None, []
    for index in range(count):
        node = sequence.GetNthDataNode(index)
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(sequence.GetName(), f"item {index} is a {node.GetClassName()}, not a volume")
        frames.append(_array_of(node))
        this = _geometry_of(node)
        if geometry is None:
            geometry = this
        elif (
            frames[-1].shape != frames[0].shape
            or not np.allclose(this["spacing"], geometry["spacing"], rtol=1e-5)
            or not np.allclose(this["direction"], geometry["direction"], atol=1e-5)
            or not np.allclose(this["origin"], geometry["origin"], atol=1e-3)
        ):
            raise InputError(sequence.GetName(), f"frame {index} has another grid than frame 0; a cine needs one grid for all frames")
        times.append(sequence.GetNthIndexValue(index))
    frame_times = None
    if sequence.GetIndexType() == sequence.NumericIndex:
        scale = {"s": 1000.0, "ms": 1.0}.get(sequence.GetIndexUnit(), None)
        values = np.array([float(t) for t in times])
        if scale is not None and np.all(np.diff(values) > 0):
            frame_times = values * scale
    assert geometry is not None
    return CineStack(
        data=np.stack(frames),
        frame_times_ms=frame_times,
        metadata={"source_dtype": str(frames[0].dtype), "source_node": sequence.GetName()},
        source=sequence.GetName(),
        **geometry,
    )


def sequence_from_stack(
    scene: Any, stack: CineStack, name: str, labelmap: bool = False, browser: Any = None, index_like: Any = None, index_frames: list[int] | None = None
) -> tuple[Any, Any]:
    """A new sequence node (one volume per frame, index = time in ms) and a browser showing it.

    With ``browser`` (e.g. the input cine's), the new sequence is added to it as a
    synchronised sequence, so that both move together frame by frame. With ``index_like``
    (a sequence, e.g. the input cine), the new sequence copies its index (name, unit, type
    and the values of its frames ``index_frames``, default all) exactly: a browser pairs the
    frames of its sequences by index value, whatever the unit, so the output must use the
    input's own values, and a selection of frames keeps their own. A stack without frame
    times is indexed by frame number (index "frame", no unit), never by made-up times.
    """
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    frames = list(range(stack.n_frames)) if index_frames is None else list(index_frames)
    if len(frames) != stack.n_frames:
        raise ValueError(f"index_frames names {len(frames)} frames; the stack has {stack.n_frames}")
    if index_like is not None and index_like.GetNumberOfDataNodes() > max(frames):
        sequence.SetIndexName(index_like.GetIndexName())
        sequence.SetIndexUnit(index_like.GetIndexUnit())
        sequence.SetIndexType(index_like.GetIndexType())
        values = [index_like.GetNthIndexValue(frame) for frame in frames]
    elif stack.frame_times_ms is not None:
        sequence.SetIndexName("time")
        sequence.SetIndexUnit("ms")
        sequence.SetIndexType(sequence.NumericIndex)
        values = [f"{float(t):g}" for t in stack.frame_times_ms]
    else:
        sequence.SetIndexName("frame")
        sequence.SetIndexUnit("")
        sequence.SetIndexType(sequence.NumericIndex)
        values = [str(frame) for frame in frames]
    template = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    for frame in range(stack.n_frames):
        _fill_volume(template, stack, frame, labelmap)
        sequence.SetDataNodeAtValue(template, values[frame])
    if browser is not None:
        browser.AddSynchronizedSequenceNode(sequence)
        return sequence, browser
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    return sequence, browser


def browser_of(scene: Any, sequence: Any) -> Any:
    """The first sequence browser that plays ``sequence``, or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        if browser.IsSynchronizedSequenceNode(sequence.GetID(), True):
            return browser
    return None


def segmentation_from_labels(scene: Any, labels: CineStack, name: str, frame: int = 0, closed_surfaces: bool = True) -> Any:
    """A segmentation node (RV cavity, LV myocardium, LV cavity) from one frame of a label stack,
    with closed surfaces for the 3D view. Needs the Segmentations logic attached to the scene."""
    labelmap = volume_from_stack(scene, labels, f"{name} labels", frame, labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
        raise InputError(name, "the labels could not be imported into a segmentation")
    if labelmap.GetDisplayNode() is not None:  # RemoveNode leaves it behind, saved with the scene
        scene.RemoveNode(labelmap.GetDisplayNode())
    scene.RemoveNode(labelmap)
    segments = segmentation.GetSegmentation()
    present = sorted(int(v) for v in np.unique(np.rint(labels.data[frame])) if v > 0)
    for index, value in enumerate(present):
        segment = segments.GetNthSegment(index)
        title, colour = SEGMENTS.get(value, (f"label {value}", (0.8, 0.8, 0.8)))
        segment.SetName(title)
        segment.SetColor(*colour)
    if closed_surfaces and not segmentation.CreateClosedSurfaceRepresentation():
        raise InputError(name, "closed surfaces could not be made (is the Segmentations logic attached to the scene?)")
    return segmentation


def orient_slice_node(slice_node: Any, plane: Any, transform: Any = None) -> np.ndarray:
    """Put a slice view on a calid ``Plane`` (LPS) and return its SliceToRAS matrix.

    A view shows its second axis upwards, while calid's PNG and NIfTI reslices have
    rows running down along ``v``; the view looks at the plane from the side of
    ``-normal`` so that ``-v`` is up and both show the same picture (apex at the top).
    ``transform``: the plane is in the coordinates of the nodes under this transform node
    (the input's), which views show moved by it.
    """
    ras = {key: np.asarray(value, dtype=np.float64) for key, value in plane.to_ras().items()}
    if transform is not None:
        to_world = _transform_between(transform, None)
        centre = np.asarray(to_world.TransformPoint(ras["centre"]))
        # The plane's two in-plane directions as the transform moves them at the centre; the plane they
        # span is the transformed plane (also under scaling or shear); the normal is theirs.
        v = np.cross(ras["normal"], ras["u"])
        u_world = np.asarray(to_world.TransformPoint(ras["centre"] + ras["u"])) - centre
        v_world = np.asarray(to_world.TransformPoint(ras["centre"] + v)) - centre
        normal = np.cross(u_world, v_world)
        normal /= np.linalg.norm(normal)
        ras = {"centre": centre, "normal": normal, "u": u_world / np.linalg.norm(u_world)}
    slice_node.SetSliceToRASByNTP(*(-ras["normal"]), *ras["u"], *ras["centre"], 0)
    matrix = slice_node.GetSliceToRAS()
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


#: Row titles of the summary table, by calid's summary key.
SUMMARY_ROWS = {
    "lv_edv_ml": "LV end-diastolic volume (ml)",
    "lv_esv_ml": "LV end-systolic volume (ml)",
    "lv_sv_ml": "LV stroke volume (ml)",
    "lv_ef_percent": "LV ejection fraction (%)",
    "rv_edv_ml": "RV end-diastolic volume (ml)",
    "rv_esv_ml": "RV end-systolic volume (ml)",
    "rv_sv_ml": "RV stroke volume (ml)",
    "rv_ef_percent": "RV ejection fraction (%)",
    "lv_mass_ed_g": "LV mass at end-diastole (g)",
}
#: The rows for one frame ("current frame"): no phase to name, no stroke volume or ejection fraction.
ONE_FRAME_SUMMARY_ROWS = {"lv_edv_ml": "LV volume (ml)", "rv_edv_ml": "RV volume (ml)", "lv_mass_ed_g": "LV mass (g)"}


def summary_table_from_function(scene: Any, results: dict[str, Any], name: str = "Cardiac function summary") -> Any:
    """A table node of the cine's summary numbers (EDV, ESV, SV, EF, LV mass): a row per
    quantity, a column per method (dense stack, Simpson on the acquired slices)."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    quantity = vtk.vtkStringArray()
    quantity.SetName("quantity")
    rows = ONE_FRAME_SUMMARY_ROWS if all(len(result.lv_volume_ml) == 1 for result in results.values()) else SUMMARY_ROWS
    for title in rows.values():
        quantity.InsertNextValue(title)
    table.AddColumn(quantity)
    for method, result in results.items():
        values = vtk.vtkDoubleArray()
        values.SetName(method)
        for key in rows:
            values.InsertNextValue(float(result.summary.get(key, float("nan"))))
        table.AddColumn(values)
    return table


def table_from_function(scene: Any, results: dict[str, Any], name: str = "Cardiac function") -> tuple[Any, Any]:
    """A table node (one row per frame and method) and a plot chart of the LV / RV volume curves."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    first = next(iter(results.values()))
    n_frames = len(first.lv_volume_ml)
    # Frames without trigger times are plotted by their frame number in the cine, not as made-up times.
    frames = first.cine_frames if first.cine_frames is not None else np.arange(n_frames)
    x_column, x_title = ("time_ms", "time (ms)") if first.frame_times_ms is not None else ("frame", "frame of the cine" if first.cine_frames is not None else "frame")
    columns = {x_column: first.frame_times_ms if first.frame_times_ms is not None else np.asarray(frames, dtype=float)}
    for method, result in results.items():
        columns[f"LV ml ({method})"] = result.lv_volume_ml
        columns[f"RV ml ({method})"] = result.rv_volume_ml
        columns[f"LV mass g ({method})"] = result.lv_myocardium_ml * MYOCARDIAL_DENSITY_G_PER_ML
    for title, values in columns.items():
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        for value in values:
            array.InsertNextValue(float(value))
        table.AddColumn(array)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle("volume (ml)")
    for title in columns:
        if title.startswith(("LV ml", "RV ml")):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name}: {title}")  # the run's name: legends of several runs stay apart
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(x_column)
            series.SetYColumnName(title)
            series.SetPlotType(series.PlotTypeScatter)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table, chart


def shown_node(scene: Any, node: Any) -> Any:
    """The node Slicer displays for ``node``: a sequence's proxy volume in its browser, else the node itself."""
    if node is not None and node.IsA("vtkMRMLSequenceNode"):
        browser = browser_of(scene, node)
        return browser.GetProxyNode(node) if browser is not None else None
    return node


def parent_transform(scene: Any, node: Any) -> Any:
    """The transform node the input is shown under (a cine: its proxy volume's), or None."""
    shown = shown_node(scene, node)
    return shown.GetParentTransformNode() if shown is not None else None


def place_under(scene: Any, node: Any, transform: Any) -> None:
    """Show ``node`` (a sequence: its proxy volume) under ``transform``, as the input is: the
    output is computed in the input's own coordinates and must overlay it in the views."""
    shown = shown_node(scene, node)
    if transform is not None and shown is not None:
        shown.SetAndObserveTransformNodeID(transform.GetID())


def _transform_between(source: Any, target: Any) -> Any:
    """A vtkGeneralTransform from ``source``'s coordinates to ``target``'s (None: world); linear or not."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, transform)
    return transform


def points_from_markups(node: Any, local_to: Any = None) -> np.ndarray:
    """(N, 3) LPS mm of a markups node's defined control points: in world coordinates, or in the
    coordinates of the nodes under the transform node ``local_to`` (the input's own, where the
    network's planes are computed)."""
    if node is None:
        return np.zeros((0, 3))
    to_local = _transform_between(None, local_to) if local_to is not None else None
    points = []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:  # skip points being placed or missing
            continue
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, ras)
        if to_local is not None:
            ras = list(to_local.TransformPoint(ras))
        points.append(LPS_TO_RAS @ np.asarray(ras, dtype=np.float64))
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def _view_xml(node_class: str, tag: str, label: str, colour: str | None = None) -> str:
    colour_property = f'<property name="viewcolor" action="default">{colour}</property>' if colour else ""
    return f'<item><view class="{node_class}" singletontag="{tag}"><property name="viewlabel" action="default">{label}</property>{colour_property}</view></item>'


#: The layout a result is shown in: the three long-axis views on top, and below them the 3D
#: surfaces, the volume curves and the summary table. (Slicer's own layouts with a plot view
#: give up a slice view or the 3D view for it.)
RESULT_LAYOUT_ID = 26001
RESULT_LAYOUT_XML = (
    '<layout type="vertical">'
    '<item><layout type="horizontal">'
    + _view_xml("vtkMRMLSliceNode", "Red", "R", "#F34A33") + _view_xml("vtkMRMLSliceNode", "Yellow", "Y", "#EDD54C") + _view_xml("vtkMRMLSliceNode", "Green", "G", "#6EB04B")
    + "</layout></item>"
    '<item><layout type="horizontal">'
    + _view_xml("vtkMRMLViewNode", "1", "1") + _view_xml("vtkMRMLPlotViewNode", "PlotView1", "P") + _view_xml("vtkMRMLTableViewNode", "TableView1", "T")
    + "</layout></item>"
    "</layout>"
)


def result_layout(layout_node: Any) -> int:
    """The id of :data:`RESULT_LAYOUT_XML`, registered with ``layout_node`` (once)."""
    if not layout_node.IsLayoutDescription(RESULT_LAYOUT_ID):
        layout_node.AddLayoutDescription(RESULT_LAYOUT_ID, RESULT_LAYOUT_XML)
    return RESULT_LAYOUT_ID


def show_function(scene: Any, chart: Any, table: Any) -> None:
    """The volume curves and the summary table in the result layout's plot and table views
    (which the layout logic creates when the layout is set)."""
    plot_view = scene.GetSingletonNode("PlotView1", "vtkMRMLPlotViewNode")
    table_view = scene.GetSingletonNode("TableView1", "vtkMRMLTableViewNode")
    if plot_view is not None and chart is not None:
        plot_view.SetPlotChartNodeID(chart.GetID())
    if table_view is not None and table is not None:
        table_view.SetTableNodeID(table.GetID())
