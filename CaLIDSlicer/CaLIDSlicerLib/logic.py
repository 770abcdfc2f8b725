"""The module's work as one blocking call on a scene (the Python console, batch scripts, and the
background worker all use it)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calid.data.stack import SELECTION_KEYS, CineStack, describe_upsampling
from calid.errors import InputError
from calid.evaluation.methods import PIXEL_METHODS as PIXEL_MODES  # light: no PyTorch when Slicer loads the module

from CaLIDSlicerLib import mrml


@dataclass
class UpsamplingOptions:
    """What the panel (or a script) asks for."""

    factor: int = 4
    mode: str = "calid"
    steps: int | None = None  # None: the model's validated default (calid info)
    seed: int = 0
    device: str = "auto"
    model: str | None = None  # a file, an installed name, or None for the default model
    frames: str | None = None  # "all" / None, "3", "0,5-9"
    segment: bool = True
    centre_on_heart: bool = False  # centre the model's crop on the segmented heart (full field-of-view scans)
    segmentation_model: str | None = None
    #: A cine saved without geometry (all spacings exactly 1 mm): the pixel size the network is shown:
    #: "model" (what the model's training assumed), "keep" (1 mm) or a size in mm, as ``calid upsample --placeholder-spacing``.
    placeholder_spacing: str | None = "model"  # None: "model"
    #: Test-time augmentation (calid, calid+): average over the 8 rotations and reflections of the slice plane.
    tta: bool = False
    #: Points placed by the user (LPS mm): 1 = aortic valve (3-chamber plane), 3 = a plane of their own.
    plane_points_lps: tuple[tuple[float, float, float], ...] | None = None  # in the input's own coordinates (its parent transform undone)


@dataclass
class UpsamplingResult:
    """The nodes made (the input is never modified) and the numbers behind them."""

    dense: CineStack
    output_node: Any
    browser_node: Any = None
    labels: CineStack | None = None
    segmentation_node: Any = None
    planes: dict[str, Any] = field(default_factory=dict)
    table_node: Any = None
    chart_node: Any = None
    summary_table_node: Any = None  # EDV, ESV, SV, EF, LV mass per method
    function: dict[str, Any] = field(default_factory=dict)
    #: What did not work but did not stop the run (e.g. the segmentation of an unusual scan).
    warnings: list[str] = field(default_factory=list)
    #: The input's parent transform node (None: none). The outputs are placed under it too; the
    #: planes are in the input's own coordinates (show them with ``mrml.orient_slice_node(..., transform)``).
    parent_transform: Any = None
    #: True when only some of the input's frames were upsampled (--frames, "current frame").
    frame_selection: bool = False


def stack_from_node(node: Any) -> CineStack:
    """A CineStack from a scalar volume node or a sequence node of volumes."""
    if node is None:
        raise InputError("input", "select an input volume or volume sequence")
    if node.IsA("vtkMRMLSequenceNode"):
        first = node.GetNthDataNode(0) if node.GetNumberOfDataNodes() else None
        if first is not None and first.IsA("vtkMRMLLabelMapVolumeNode"):  # as a single label map volume is refused
            raise InputError(node.GetName(), "is a sequence of label maps; select a grey-level volume or a volume sequence")
        stack = mrml.stack_from_sequence(node)
    elif node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
        stack = mrml.stack_from_volume(node)
    else:
        raise InputError(node.GetName(), f"is a {node.GetClassName()}; select a grey-level volume or a volume sequence")
    if stack.n_slices < 2:  # refused here, before a background run writes files and starts a worker
        raise InputError(node.GetName(), f"has {stack.n_slices} slice(s); upsampling needs a short-axis stack of at least 2 parallel slices")
    _restore_provenance(node, stack)
    return stack


def _restore_provenance(node: Any, stack: CineStack) -> None:
    """A CaLID output used as input again keeps its record (where its acquired slices are, how far
    apart), so that upsampling it again and its volumes still know what was acquired."""
    import json

    from calid.data.io import restore_record

    text = node.GetAttribute(PROVENANCE_ATTRIBUTE)
    if not text:
        return
    try:
        record = json.loads(text)
    except ValueError:
        return  # an attribute edited by hand: the node is taken as acquired
    try:
        selection = json.loads(node.GetAttribute(SELECTION_ATTRIBUTE) or "{}")  # absent from scenes of earlier versions
    except ValueError:
        selection = {}  # which frames is lost, not what was generated
    if not isinstance(selection, dict):
        selection = {}
    # restore_record leaves out entries of the wrong kind; only the selection's keys are taken from that attribute
    restore_record(stack.metadata, {"upsampling": record, **{key: value for key, value in selection.items() if key in SELECTION_KEYS}})


def upsample_node(
    scene: Any,
    input_node: Any,
    options: UpsamplingOptions,
    progress: Callable[[float, float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    pipeline: Any = None,
) -> UpsamplingResult:
    """Upsample the input node into new nodes; optionally segment, place the long-axis planes and measure volumes."""
    from calid.inference import load_pipeline

    stack = stack_from_node(input_node)
    if pipeline is None:
        check_model_available(options)
        pipeline = load_pipeline(options.mode if options.mode in PIXEL_MODES and options.model is None else options.model, device=options.device)
    assumed_pixel_mm = pipeline.assumed_pixel_mm_for(options.placeholder_spacing)  # a bad value fails before any work
    centre = None
    if options.centre_on_heart and options.mode not in PIXEL_MODES:
        from calid.inference import parse_frames
        from calid.segmentation.inference import heart_centre_lps

        chosen = parse_frames(options.frames, stack.n_frames)
        centre = heart_centre_lps(stack, frame=chosen[0] if chosen else 0)
    dense = pipeline.upsample(
        stack, options.factor, mode=options.mode, steps=options.steps, seed=options.seed, frames=options.frames, progress=progress, cancel=cancel, centre_lps=centre,
        assumed_pixel_mm=assumed_pixel_mm, tta=options.tta,
    )
    result = _add_output(scene, input_node, stack, dense, options)
    if dense.metadata["upsampling"].get("warning"):  # (a background run has the worker print it)
        result.warnings.append(dense.metadata["upsampling"]["warning"])
    try:
        if options.segment:
            _segment_and_measure_or_warn(scene, stack, result, options, cancel)
        _add_user_plane(result, options)
    except BaseException:
        _remove_output(scene, result)  # cancelled or failed means nothing is added, as in the panel
        raise
    return result


def _remove_output(scene: Any, result: UpsamplingResult) -> None:
    """Take the dense output back out of the scene: its node, and its place in a browser (the
    input's, which stays, or its own, which goes with its proxy node), with their display and
    storage nodes."""
    _remove_segmentation_nodes(scene, result)
    output, browser = result.output_node, result.browser_node
    if browser is not None:
        proxy = browser.GetProxyNode(output)
        if browser.GetMasterSequenceNode() is output:
            scene.RemoveNode(browser)
        else:
            browser.RemoveSynchronizedSequenceNode(output.GetID())
        if proxy is not None:
            _remove_with_its_helpers(scene, proxy)
    _remove_with_its_helpers(scene, output)


def _remove_segmentation_nodes(scene: Any, result: UpsamplingResult) -> None:
    """The segmentation, the function tables and the chart of a result, with their helpers."""
    for node in (result.segmentation_node, result.table_node, result.chart_node, result.summary_table_node):
        if node is not None and scene.IsNodePresent(node):
            _remove_with_its_helpers(scene, node)
    result.segmentation_node, result.table_node, result.chart_node, result.summary_table_node = None, None, None, None


def _remove_with_its_helpers(scene: Any, node: Any) -> None:
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] if hasattr(node, "GetNumberOfDisplayNodes") else []
    helpers += [node.GetStorageNode()] if hasattr(node, "GetStorageNode") else []
    helpers += [node.GetNthPlotSeriesNode(i) for i in range(node.GetNumberOfPlotSeriesNodes())] if hasattr(node, "GetNumberOfPlotSeriesNodes") else []  # a chart's curves
    for helper in helpers:
        if helper is not None:
            scene.RemoveNode(helper)
    scene.RemoveNode(node)


def _add_user_plane(result: UpsamplingResult, options: UpsamplingOptions) -> None:
    """Three user points define a plane of their own ("user"), shown instead of the 3-chamber view."""
    from calid.geometry.planes import Plane

    points = options.plane_points_lps
    if points is not None and len(points) == 3:
        import numpy as np

        result.planes["user"] = Plane.from_points("user", *(np.asarray(p, dtype=np.float64) for p in points))


def _add_output(scene: Any, input_node: Any, stack: CineStack, dense: CineStack, options: UpsamplingOptions) -> UpsamplingResult:
    """New node(s) for the dense stack: a volume, or a sequence played by the input cine's own
    browser (synchronised) when every frame was upsampled, else by a browser of its own."""
    upsampling = dense.metadata.get("upsampling", {})
    selection = _is_frame_selection(dense, stack)
    # A new name each run (GenerateUniqueName), so that runs with other settings stay apart.
    name = scene.GenerateUniqueName(
        f"{input_node.GetName()} {options.mode} x{options.factor}" + (" tta" if upsampling.get("tta") else "") + (_frames_in_words(dense) if selection else "")
    )
    if dense.n_frames == 1:
        result = UpsamplingResult(dense=dense, output_node=mrml.volume_from_stack(scene, dense, name))
    else:
        from_sequence = input_node.IsA("vtkMRMLSequenceNode")
        whole_cine = from_sequence and dense.n_frames == stack.n_frames
        # The frames keep the input's own index values (a selection too), so they can be told apart.
        output, browser = mrml.sequence_from_stack(
            scene, dense, name, browser=mrml.browser_of(scene, input_node) if whole_cine else None, index_like=input_node if from_sequence else None,
            index_frames=upsampling.get("frames") or list(range(dense.n_frames)),
        )
        result = UpsamplingResult(dense=dense, output_node=output, browser_node=browser)
    result.frame_selection = selection
    _record_provenance(result.output_node, dense, result.frame_selection)
    result.parent_transform = mrml.parent_transform(scene, input_node)
    mrml.place_under(scene, result.output_node, result.parent_transform)
    return result


def _is_frame_selection(dense: CineStack, stack: CineStack) -> bool:
    """Whether the dense output holds only some frames of the cine: fewer than the input, or than the
    cine the input itself was selected from (a selection's output upsampled again)."""
    count = dense.metadata.get("source_frame_count")
    numbers = dense.recorded_frames()  # frame numbers other than 0..n-1 (e.g. 4,6,7): a selection, also without a count
    return dense.n_frames < stack.n_frames or (isinstance(count, int) and dense.n_frames < count) or (numbers is not None and numbers != list(range(dense.n_frames)))


def _frames_in_words(dense: CineStack) -> str:
    """For a selection's node name: which frames of the cine it holds (" frame 8", " frames 4,6,7", " 12 frames")."""
    numbers = dense.recorded_frames() or list(range(dense.n_frames))  # the cine's own frame numbers
    if len(numbers) == 1:
        return f" frame {numbers[0]}"
    return " frames " + ",".join(map(str, numbers)) if len(numbers) <= 4 else f" {len(numbers)} frames"


#: Node attribute holding how the output was made (calid's "upsampling" metadata, JSON), saved with the scene.
PROVENANCE_ATTRIBUTE = "CaLID.upsampling"
#: Node attribute holding which frames of which cine the output holds (calid's selection record, JSON).
SELECTION_ATTRIBUTE = "CaLID.selection"


def _record_provenance(node: Any, dense: CineStack, frame_selection: bool) -> None:
    """Which slices were generated and how (model, mode, steps, seed, tta) travel with the node in a
    saved scene; the description says in words that the in-between slices are generated."""
    import json

    upsampling = dense.metadata.get("upsampling", {})
    node.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(upsampling, default=str))
    node.SetAttribute(SELECTION_ATTRIBUTE, json.dumps({key: dense.metadata[key] for key in SELECTION_KEYS if key in dense.metadata}, default=str))
    how = ", ".join(f"{key} {upsampling[key]}" for key in ("mode", "factor", "steps", "seed", "model") if upsampling.get(key) is not None)
    if upsampling.get("earlier_upsampling"):
        how += f"; made by {describe_upsampling(upsampling)}"
    every = dense.acquired_slice_step() or upsampling.get("factor", "?")  # 4 for x2 of x2
    frames = dense.recorded_frames() if frame_selection else None  # which frames of the cine, as the node's name says
    which = f" Frame(s) {', '.join(map(str, frames))} of the cine." if frames else ""
    node.SetDescription(f"Generated by CaLID ({how}): only 1 slice in {every} is acquired; the slices between are generated.{which}")


def _segment_and_measure_or_warn(
    scene: Any,
    sparse: CineStack,
    result: UpsamplingResult,
    options: UpsamplingOptions,
    cancel: Callable[[], bool] | None,
    labels: Callable[[], tuple[CineStack, CineStack]] | None = None,
) -> None:
    """The dense output is the result; its segmentation is an extra. When that fails (no model
    installed, no heart found in an unusual scan) the output stays and a warning says why.
    ``labels``: reads the (dense, acquired) label stacks when a worker has already made them
    (inside the guard: an unreadable label file is a warning too)."""
    from calid.errors import CalidError, Cancelled

    try:
        dense_labels, acquired_labels = labels() if labels is not None else _segment(sparse, result, options, cancel)
        _measure(scene, result, options, dense_labels, acquired_labels)
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - also a network's own error (out of GPU memory ...): the dense output stays
        reason = str(error) if isinstance(error, CalidError) else f"{type(error).__name__}: {error}"
        _drop_segmentation(scene, result, f"The dense volume was made, but segmentation, long-axis planes and volumes were skipped: {reason}")


def _drop_segmentation(scene: Any, result: UpsamplingResult, warning: str) -> None:
    """All or nothing: no segmentation without its planes and volumes, no orphaned nodes."""
    _remove_segmentation_nodes(scene, result)
    result.labels, result.planes, result.function = None, {}, {}
    result.warnings.append(warning)


def _segment(sparse: CineStack, result: UpsamplingResult, options: UpsamplingOptions, cancel: Callable[[], bool] | None) -> tuple[CineStack, CineStack]:
    """Labels of the dense output and of the acquired stack (same frames), in this process."""
    from calid.device import resolve_device
    from calid.inference.baselines import acquired_slices
    from calid.models.registry import resolve_model
    from calid.segmentation import load_segmenter, segment

    model = load_segmenter(resolve_model(options.segmentation_model, kind="segmentation"), device=resolve_device(options.device))
    frames = result.dense.metadata.get("upsampling", {}).get("frames") or list(range(sparse.n_frames))
    # Simpson's method on the acquired slices only, also when the input was itself upsampled.
    acquired = acquired_slices(sparse.select_frames(frames))
    return segment(result.dense, model, cancel=cancel), segment(acquired, model, cancel=cancel)


def _measure(scene: Any, result: UpsamplingResult, options: UpsamplingOptions, dense_labels: CineStack, acquired_labels: CineStack) -> None:
    """Volumes (dense and Simpson), the segmentation node, the long-axis planes and the table."""
    import numpy as np

    from calid.errors import CalidError
    from calid.geometry.planes import standard_planes
    from calid.geometry.volumes import cardiac_function

    if dense_labels.shape != result.dense.shape or acquired_labels.n_frames != result.dense.n_frames:
        raise InputError("segmentation", f"labels of shape {dense_labels.shape} / {acquired_labels.shape} do not match the dense output {result.dense.shape}")
    result.labels = dense_labels
    function = {"dense": cardiac_function(dense_labels, method="dense"), "acquired (Simpson)": cardiac_function(acquired_labels, method="Simpson")}
    result.function = function
    for method, measured in function.items():  # a file without geometry, frames without an LV, one frame
        result.warnings += [f"{method} volumes: {warning}" for warning in measured.warnings if f"{method} volumes: {warning}" not in result.warnings]
    shown = function["dense"].ed_frame  # the position in the output
    # One frame is segmented into nodes; the name says which frame of the cine, as it is shown over the whole cine,
    # and calls it end-diastole only where every frame was run (else: the largest LV of those run).
    numbers = result.dense.recorded_frames()
    frame = numbers[shown] if numbers else shown
    if result.dense.n_frames == 1:
        phase = ""
    elif result.frame_selection:
        phase = f", the largest LV of the {result.dense.n_frames} frames run"
    else:
        phase = ", end-diastole"
    result.segmentation_node = mrml.segmentation_from_labels(scene, dense_labels, f"{result.output_node.GetName()} segmentation (frame {frame}{phase})", frame=shown)
    mrml.place_under(scene, result.segmentation_node, result.parent_transform)
    result.table_node, result.chart_node = mrml.table_from_function(scene, function, f"{result.output_node.GetName()} function")
    result.summary_table_node = mrml.summary_table_from_function(scene, function, f"{result.output_node.GetName()} function summary")
    points = options.plane_points_lps
    aortic_valve = None if points is None or len(points) != 1 else np.asarray(points[0], dtype=np.float64)
    try:
        result.planes = standard_planes(dense_labels, shown, three_chamber_point=aortic_valve)
    except CalidError as error:
        # The planes need a clear LV and RV; the volumes and the segmentation stand without them.
        user = " (your 3 points still give a plane of your own)" if points is not None and len(points) == 3 else "; place 3 long-axis points for a plane of your own"
        result.warnings.append(f"The long-axis planes were not placed: {error}{user}")


#: File names exchanged with the worker processes. NIfTI keeps calid's metadata (what was generated, how);
#: uncompressed, because Slicer's own process reads the results (a x8 cine is hundreds of MB, and
#: decompressing it would freeze the panel for seconds) and the files are temporary.
WORKER_INPUT, WORKER_OUTPUT = "input.nii", "dense.nii"
WORKER_DENSE_LABELS, WORKER_ACQUIRED_LABELS = "dense_labels.nii", "acquired_labels.nii"
#: The acquired slices alone, for Simpson's method, when the input is itself an upsampled stack.
WORKER_ACQUIRED_INPUT = "acquired.nii"
#: Created to cancel: the worker stops at its next check even where killing Slicer's Python
#: launcher leaves the Python process itself running.
WORKER_STOP = "stop"


@dataclass
class WorkerStage:
    """One background process of a run: what the panel shows, the command, and whether its
    failure only loses an extra (the segmentation) rather than the run."""

    label: str
    command: list[str]
    optional: bool = False


@dataclass
class BackgroundJob:
    """The files and processes of one background run (the panel runs the stages in order)."""

    folder: Path
    stages: list[WorkerStage]
    output: Path
    label_files: tuple[Path, Path] | None = None  # (dense, acquired) when segmenting

    @property
    def stop_file(self) -> Path:
        return self.folder / WORKER_STOP

    def request_stop(self) -> None:
        """Ask the running worker to stop (``--stop-file``); it writes nothing and exits with 130."""
        if self.folder.is_dir():
            self.stop_file.touch()


#: Command-line options that workers' messages suggest, as the panel's controls that set them.
PANEL_CONTROLS = {"(--placeholder-spacing MM)": "('Files without geometry' > 'Pixel size (mm)' in the panel)"}


def in_panel_words(job: BackgroundJob, messages: list[str], input_name: str) -> list[str]:
    """The workers' messages as the panel shows them: their temporary files named by what they
    hold (the input node, the dense output), each message once."""
    names = {
        job.folder / WORKER_INPUT: f"the input '{input_name}'",
        job.folder / WORKER_ACQUIRED_INPUT: f"the acquired slices of '{input_name}'",
        job.folder / WORKER_OUTPUT: "the dense output",
        job.folder / WORKER_DENSE_LABELS: "the dense output's labels",
        job.folder / WORKER_ACQUIRED_LABELS: "the acquired slices' labels",
    }
    shown: list[str] = []
    for message in messages:
        for path, name in names.items():
            message = message.replace(str(path), name)
        message = message.replace(str(job.folder), "the work folder")
        for option, control in PANEL_CONTROLS.items():
            message = message.replace(option, control)
        if message not in shown:
            shown.append(message)
    return shown


def check_model_available(options: UpsamplingOptions) -> None:
    """Refuse, in the panel's words, a model-based method with no model chosen and none installed
    (before any file is written or worker started: the worker's message speaks of command options)."""
    if options.mode in PIXEL_MODES or options.model is not None:
        return
    from calid.models.registry import default_model

    if default_model("calid") is None:
        raise InputError(
            "Method",
            "no CaLID model is installed (none ships with this version of the extension). Choose the Registration or Linear method, "
            "or a trained model file (in the panel: Model > 'Load from file...'; in scripts: --model PATH or model=PATH)",
        )


def prepare_background(input_node: Any, options: UpsamplingOptions) -> BackgroundJob:
    """Write the input for the worker processes: upsampling, then (when asked) segmenting the
    dense output and the acquired frames, so that no network runs in Slicer's own process."""
    from calid.data.io import write_stack

    from CaLIDSlicerLib.process import segment_command, upsample_command, work_folder

    from calid.inference import parse_frames
    from calid.inference.baselines import acquired_slices

    check_model_available(options)
    stack = stack_from_node(input_node)
    parse_frames(options.frames, stack.n_frames, "Frames")  # in the panel's words, before any file is written
    folder = work_folder()
    with warnings.catch_warnings():
        # Uneven frame times: NIfTI's single interval is for other programs; the worker reads the true
        # times back from calid's own header extension, so the warning has nothing to say here.
        warnings.filterwarnings("ignore", message=".*not evenly spaced in time")
        source = write_stack(stack, folder / WORKER_INPUT)
        acquired = acquired_slices(stack)  # Simpson's method on the acquired slices, also of an upsampled input
        acquired_source = source if acquired is stack else write_stack(acquired, folder / WORKER_ACQUIRED_INPUT)
    output, stop = folder / WORKER_OUTPUT, folder / WORKER_STOP
    job = BackgroundJob(folder=folder, stages=[WorkerStage("Upsampling", upsample_command(source, output, options, stop_file=stop))], output=output)
    if options.segment:
        dense_labels, acquired_labels = folder / WORKER_DENSE_LABELS, folder / WORKER_ACQUIRED_LABELS
        job.stages += [
            WorkerStage("Segmenting the dense volume", segment_command(output, dense_labels, options, stop_file=stop), optional=True),
            WorkerStage("Segmenting the acquired slices", segment_command(acquired_source, acquired_labels, options, frames=options.frames, stop_file=stop), optional=True),
        ]
        job.label_files = (dense_labels, acquired_labels)
    return job


def finish_background(scene: Any, input_node: Any, job: BackgroundJob, options: UpsamplingOptions, warnings: list[str] | None = None) -> UpsamplingResult:
    """Load the workers' results into new nodes (the input cine's browser plays a whole-cine
    output), then measure and place the planes from their labels, as :func:`upsample_node` does.
    ``warnings``: why a segmentation stage failed, if one did (the output is still added)."""
    from calid.data.io import read_stack

    stack = stack_from_node(input_node)
    result = _add_output(scene, input_node, stack, read_stack(job.output), options)
    try:
        if options.segment:
            files = job.label_files
            if warnings or files is None or not all(path.is_file() for path in files):
                reason = "; ".join(warnings or []) or "the segmentation worker wrote no labels"
                _drop_segmentation(scene, result, f"The dense volume was made, but segmentation, long-axis planes and volumes were skipped: {reason}")
            else:
                _segment_and_measure_or_warn(scene, stack, result, options, None, labels=lambda: (read_stack(files[0]), read_stack(files[1])))
        _add_user_plane(result, options)
    except BaseException:
        _remove_output(scene, result)  # an error after the output was added: nothing stays half-made in the scene
        raise
    return result
