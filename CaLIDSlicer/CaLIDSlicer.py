"""CaLID: dense cardiac volumes from sparse short-axis cine MRI (3D Slicer scripted module).

The widget is thin: it collects options, runs ``calid upsample`` in a background
process (progress bar, Cancel), then builds the output nodes, the segmentation,
the long-axis views and the volume table with the functions of CaLIDSlicerLib,
which are tested headless. ``CaLIDSlicerLogic.process`` is the same work as a
blocking call for the Python console and ``Slicer --python-script`` batches.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Any, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

# Only calid-free imports at the top: Slicer loads this module before the first-use installer ran.
from CaLIDSlicerLib.choices import FACTORS, FrameSelection, Method, PlaceholderSpacing
from CaLIDSlicerLib.dependencies import interpolation_model_installed, register_bundled_models

#: Slice view -> plane shown on it; a plane of the user's own ("user", from 3 points) replaces the 3-chamber view.
LAX_VIEWS = {"Red": "4-chamber", "Yellow": "2-chamber", "Green": "3-chamber"}


@parameterNodeWrapper
class CaLIDSlicerParameterNode:
    """Everything the panel sets, stored in the scene (saved with it, shared with scripts).

    Device and model are plain strings: their choices (CUDA devices, installed
    models) are only known at run time, so their combo boxes are filled and
    synchronised by the widget.
    """

    inputNode: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]  # node parameters start as None
    factor: Annotated[int, Choice(list(FACTORS))] = 4
    # What works out of the box: CaLID when a default CaLID model is installed (shipped or the user's), else
    # registration-based interpolation (no model; sharper than linear, about 1 dB PSNR above it on held-out ACDC cines).
    method: Method = Method.CALID if interpolation_model_installed() else Method.REGISTRATION
    steps: Annotated[int, WithinRange(0, 128)] = 0  # 0: the model's validated default
    seed: Annotated[int, WithinRange(0, 999999)] = 0
    frames: FrameSelection = FrameSelection.ALL
    frameRange: str = ""
    device: str = "auto"
    model: str = ""
    segment: bool = True
    centreOnHeart: bool = False
    placeholderSpacing: PlaceholderSpacing = PlaceholderSpacing.MODEL
    placeholderPixelMm: Annotated[float, WithinRange(0.1, 10.0)] = 1.4
    testTimeAugmentation: bool = False
    planePoints: vtkMRMLMarkupsFiducialNode


class CaLIDSlicer(ScriptedLoadableModule):
    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CaLID"
        self.parent.categories = ["Cardiac"]
        self.parent.dependencies = ["Sequences", "Segmentations", "Markups"]
        self.parent.contributors = ["CaLID developers"]
        register_bundled_models()  # the shipped models, for the panel, scripts and the worker processes
        self.parent.helpText = (
            "Upsamples a sparse short-axis cine MRI stack (8-10 mm between slices) to a dense 3D / 3D+T volume "
            "with a latent diffusion model trained for slice interpolation (CaLID, CaLID+), or, with no model, by registering "
            "the neighbouring slices to each other and morphing between them; then shows long-axis "
            "views, 3D surfaces and ventricular volumes. Acquired slices are kept bit for bit; the slices between them "
            "are generated, not measured. For research use, not for diagnosis."
        )
        self.parent.acknowledgementText = (
            "Method: Bubeck et al., Latent Interpolation Learning Using Diffusion Models for Cardiac Volume "
            "Reconstruction (arXiv 2508.13826). Shipped weights are trained on ACDC (CC BY-NC-SA 4.0)."
        )


class CaLIDSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: input, factor, mode, steps, seed, device, model, frames, outputs; Apply / Cancel."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CaLIDSlicerLogic | None = None
        self.process: Any = None
        self.job: dict[str, Any] = {}
        self._parameterNode: CaLIDSlicerParameterNode | None = None
        self._parameterNodeGuiTag: Any = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/CaLIDSlicer.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        panel.setMRMLScene(slicer.mrmlScene)
        # Points are placed one after the other (1: aortic valve, 3: a view of the user's own);
        # the place button alone keeps the row compact.
        self.ui.planePointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.planePointsPlaceWidget.buttonsVisible = False
        self.ui.planePointsPlaceWidget.placeButton().show()
        self.logic = CaLIDSlicerLogic()
        self.fillRunTimeChoices()
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.progressBar.hide()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def fillRunTimeChoices(self) -> None:
        """Choices known only at run time (GPUs, installed models), kept in step with the parameter
        node by hand; filled again after the first-use installation."""
        for combo in (self.ui.deviceComboBox, self.ui.modelComboBox):
            combo.blockSignals(True)
            combo.clear()
        self.ui.deviceComboBox.addItem("auto", "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        for index, name in self.logic.cuda_devices():
            self.ui.deviceComboBox.addItem(f"GPU {index}: {name}", f"cuda:{index}")
        self.ui.modelComboBox.addItem("Installed default", "")
        for name in self.logic.installed_models():
            self.ui.modelComboBox.addItem(name, name)
        self.ui.modelComboBox.addItem("Load from file...", "file")
        for combo in (self.ui.deviceComboBox, self.ui.modelComboBox):
            combo.blockSignals(False)
        self.updateGUIFromParameterNode()

    def cleanup(self) -> None:
        self.cancel(wait=True)
        self.removeObservers()
        self.setParameterNode(None)

    # ------------------------------------------------------------------ parameter node
    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Keep the node, stop driving the GUI from it while the module is hidden.
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        # A result must never land in the next case's scene.
        self.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputNode is None:
            # Exactly a grey-level volume: label maps and vector volumes are scalar-volume subclasses the selector hides.
            volumes = slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode")
            plain = [volumes.GetItemAsObject(i) for i in range(volumes.GetNumberOfItems()) if volumes.GetItemAsObject(i).GetClassName() == "vtkMRMLScalarVolumeNode"]
            self._parameterNode.inputNode = plain[0] if plain else None

    def setParameterNode(self, parameterNode: CaLIDSlicerParameterNode | None) -> None:
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller: Any = None, event: Any = None) -> None:
        """What connectGui cannot do: run-time choices, enabled states, the Apply tooltip."""
        node = self._parameterNode
        if node is None:
            return
        for combo, value in ((self.ui.deviceComboBox, node.device), (self.ui.modelComboBox, node.model)):
            index = combo.findData(value)
            if index < 0 and value:  # e.g. a model file or a GPU stored in a saved scene: show what will run
                combo.blockSignals(True)
                combo.insertItem(max(combo.count - 1, 0) if combo is self.ui.modelComboBox else combo.count, value, value)
                combo.blockSignals(False)
                index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(False)
        self.ui.framesLineEdit.setEnabled(node.frames == FrameSelection.RANGE)
        needs_model = node.method.needs_model()
        # Linear interpolation works on the pixels as stored; registration smooths in mm, so the pixel size matters to it too.
        uses_pixel_size = node.method != Method.LINEAR
        self.ui.placeholderComboBox.setEnabled(uses_pixel_size)
        self.ui.placeholderPixelSpinBox.setEnabled(uses_pixel_size and node.placeholderSpacing == PlaceholderSpacing.CUSTOM)
        # Latent-linear interpolation takes no DDIM steps; the pixel methods no model and no model window.
        self.ui.stepsSpinBox.setEnabled(node.method in (Method.CALID, Method.CALID_PLUS))
        self.ui.modelComboBox.setEnabled(needs_model)
        self.ui.centreOnHeartCheckBox.setEnabled(needs_model)
        # The other methods are deterministic functions of the neighbours, (nearly) the same in any orientation.
        self.ui.ttaCheckBox.setEnabled(node.method in (Method.CALID, Method.CALID_PLUS))
        self.ui.seedSpinBox.setEnabled(node.method == Method.CALID)
        if self.process is None:
            self.ui.applyButton.enabled = node.inputNode is not None
            self.ui.applyButton.toolTip = "Upsample the selected cine" if node.inputNode is not None else "Select an input volume or cine first"

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onModelChosen(self, index: int) -> None:
        if self._parameterNode is None:
            return
        value = self.ui.modelComboBox.itemData(index)
        if value == "file":
            path = qt.QFileDialog.getOpenFileName(None, "CaLID model", "", "CaLID model (*.safetensors)")
            if not path:
                self.updateGUIFromParameterNode()
                return
            if self.ui.modelComboBox.findData(path) < 0:
                self.ui.modelComboBox.insertItem(self.ui.modelComboBox.count - 1, path, path)
            value = path
        self._parameterNode.model = value

    # ------------------------------------------------------------------ options
    def options(self) -> Any:
        from CaLIDSlicerLib import mrml
        from CaLIDSlicerLib.parameters import options_from_parameters

        node = self._parameterNode
        # The points in the input's own coordinates, where the planes are computed (its parent transform undone).
        transform = mrml.parent_transform(slicer.mrmlScene, self.logic.sequence_of(node.inputNode)) if node.inputNode is not None else None
        return options_from_parameters(node, self.logic.current_frame(node.inputNode), mrml.points_from_markups(node.planePoints, local_to=transform))

    # ------------------------------------------------------------------ apply / cancel
    def onApply(self) -> None:
        if self.process is not None:
            self.cancel()
            return
        try:
            from CaLIDSlicerLib import dependencies

            newly_installed = bool(dependencies.missing_packages())
            if not dependencies.install(confirm=True):
                self.ui.statusLabel.text = "CaLID's Python packages are not installed; nothing was run."
                return
            if newly_installed:
                self.fillRunTimeChoices()
            options = self.options()
            node = self._parameterNode.inputNode
            with slicer.util.WaitCursor():  # writes the input cine for the workers
                background = self.logic.prepare_background(node, options)
        except Exception as error:  # shown in the panel and the log, never a frozen GUI
            self.showError(error)
            return
        # Every network (upsampling, then segmentation) runs in a worker process, one stage after
        # the other; Slicer's own process only builds the nodes at the end.
        self.job = {"background": background, "stage": 0, "options": options, "node": node, "warnings": []}
        self.ui.applyButton.text = "Cancel"
        self.ui.applyButton.toolTip = "Stop the run; nothing is added to the scene"
        self.ui.progressBar.show()
        self.startStage()

    def startStage(self) -> None:
        stage = self.job["background"].stages[self.job["stage"]]
        self.job["errors"], self.job["pending"] = [], ""
        process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.SeparateChannels)
        process.connect("readyReadStandardOutput()", self.onOutput)
        process.connect("readyReadStandardError()", lambda: self.job["errors"].append(bytes(process.readAllStandardError()).decode(errors="replace")))
        process.connect("finished(int,QProcess::ExitStatus)", self.onFinished)
        process.connect("errorOccurred(QProcess::ProcessError)", self.onProcessError)
        self.process = process
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = f"{self.stageName()}: starting..."
        process.start(stage.command[0], stage.command[1:])

    def stageName(self) -> str:
        """``Step 2 of 3, segmenting the dense volume``: the progress bar restarts with each stage."""
        stages = self.job["background"].stages
        label = stages[self.job["stage"]].label
        return label if len(stages) == 1 else f"Step {self.job['stage'] + 1} of {len(stages)}, {label[0].lower()}{label[1:]}"

    def onOutput(self) -> None:
        from CaLIDSlicerLib.process import parse_progress

        if self.process is None:
            return
        # Reads arrive in arbitrary chunks: keep an unfinished last line for the next read.
        text = self.job.get("pending", "") + bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        *lines, self.job["pending"] = text.split("\n")
        for line in lines:
            update = parse_progress(line)
            if update and update["total"]:
                self.ui.progressBar.setValue(int(100 * update["done"] / update["total"]))
                self.ui.statusLabel.text = f"{self.stageName()}: {update['message']}" if update["message"] else self.stageName()
            elif line.strip():
                self.ui.statusLabel.text = line.strip()

    def endRun(self) -> dict[str, Any]:
        """Reset the panel after the last stage (or a failure); returns the finished job."""
        job, self.job = self.job, {}
        self.ui.applyButton.text = "Apply"
        self.ui.progressBar.hide()
        self.updateGUIFromParameterNode()
        return job

    def onProcessError(self, error: Any) -> None:
        """A worker could not start (a finished signal never comes then): reset and say why."""
        if error != qt.QProcess.FailedToStart or self.process is None:
            return  # crashes and kills end with finished(), handled there
        self.process = None
        job = self.endRun()
        shutil.rmtree(job["background"].folder, ignore_errors=True)
        self.showError(RuntimeError("the background process could not be started (Slicer's Python launcher, PythonSlicer, was not found or is not executable)"))

    def onFinished(self, code: int, status: Any) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.deleteLater()  # not deleted from inside its own signal
        if not self.job:
            return
        background = self.job["background"]
        stage = background.stages[self.job["stage"]]
        messages = "".join(self.job["errors"]).strip()
        failed = None
        if not self.job.get("cancelled"):
            if status == qt.QProcess.CrashExit:
                failed = "the background process stopped unexpectedly (out of memory?); try a smaller factor, fewer frames or the CPU"
            elif code != 0:
                from CaLIDSlicerLib.logic import in_panel_words

                last_line = messages.splitlines()[-1] if messages else f"calid exited with status {code}"
                failed = in_panel_words(background, [last_line], self.job["node"].GetName())[0]  # temporary files named by what they hold
            from CaLIDSlicerLib.process import warnings_in

            self.job["warnings"] += warnings_in(messages)
            if failed is None and self.job["stage"] + 1 < len(background.stages):
                self.job["stage"] += 1
                self.startStage()
                return
        job = self.endRun()
        try:
            if job.get("cancelled"):
                self.ui.statusLabel.text = "Cancelled; nothing was added to the scene."
                return
            segmentation_failure = []
            if failed is not None:
                if not stage.optional:
                    raise RuntimeError(failed, messages)
                segmentation_failure = [failed]  # the dense volume is there: it is still shown
            if job["node"] is None or job["node"].GetScene() is None:
                self.ui.statusLabel.text = "The input was removed from the scene; the result was discarded."
                return
            with slicer.util.WaitCursor():
                result = self.logic.finish_background(job["node"], background, job["options"], segmentation_failure)
            self.logic.show(result)
            self.ui.statusLabel.text = f"Done: {result.output_node.GetName()}" + self.logic.ejection_fractions(result)
            from CaLIDSlicerLib.logic import in_panel_words

            warnings = in_panel_words(background, job["warnings"] + list(result.warnings), job["node"].GetName())
            if warnings:
                self.ui.statusLabel.text += " (with warnings: see the message)"
                slicer.util.warningDisplay("\n\n".join(warnings), windowTitle="CaLID")
        except Exception as error:
            self.showError(error)
        finally:
            shutil.rmtree(background.folder, ignore_errors=True)

    def cancel(self, wait: bool = False) -> None:
        """Stop the worker (its output is written atomically: nothing half-written remains);
        ``wait`` lets it end here, so that its temporary files go too (module cleanup, exit)."""
        if self.process is not None:
            self.job["cancelled"] = True
            # The file reaches the Python worker even where killing its launcher (PythonSlicer) does not.
            self.job["background"].request_stop()
            self.process.kill()
            if wait:
                self.process.waitForFinished(5000)
                if self.job:
                    shutil.rmtree(self.job["background"].folder, ignore_errors=True)

    def showError(self, error: Exception) -> None:
        import logging

        message = str(error.args[0]) if isinstance(error, RuntimeError) and error.args else str(error)
        details = str(error.args[1]) if isinstance(error, RuntimeError) and len(error.args) > 1 else ""
        logging.error(f"CaLID: {message}" + (f"\n{details}" if details else ""))
        self.ui.statusLabel.text = f"Error: {message}"
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(message, windowTitle="CaLID", **extra)


class CaLIDSlicerLogic(ScriptedLoadableModuleLogic):
    """The module's work without any GUI (Python console, batch scripts, the widget)."""

    def getParameterNode(self) -> CaLIDSlicerParameterNode:
        return CaLIDSlicerParameterNode(super().getParameterNode())

    def process(self, input_node: Any, options: Any = None, progress: Any = None, cancel: Any = None) -> Any:
        """Blocking: upsample ``input_node`` (volume or volume sequence; a browser's proxy volume stands for
        its whole cine, as in the panel) into new nodes; see CaLIDSlicerLib.logic."""
        from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

        return upsample_node(slicer.mrmlScene, self.sequence_of(input_node), options or UpsamplingOptions(), progress=progress, cancel=cancel)

    def prepare_background(self, input_node: Any, options: Any) -> Any:
        """Write the input for the worker processes; the stages to run (CaLIDSlicerLib.logic.BackgroundJob)."""
        from CaLIDSlicerLib.logic import prepare_background

        return prepare_background(self.sequence_of(input_node), options)

    def finish_background(self, input_node: Any, background: Any, options: Any, warnings: Any = None) -> Any:
        """Load the workers' results into new nodes; place the planes and measure from their labels."""
        from CaLIDSlicerLib.logic import finish_background

        return finish_background(slicer.mrmlScene, self.sequence_of(input_node), background, options, warnings)

    def show(self, result: Any) -> None:
        """Dense output in the views, LAX planes on the three slice views, surfaces in 3D, the table."""
        from CaLIDSlicerLib import mrml

        manager = slicer.app.layoutManager()
        if result.chart_node is not None:
            manager.setLayout(mrml.result_layout(manager.layoutLogic().GetLayoutNode()))
        else:
            manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        volume = result.browser_node.GetProxyNode(result.output_node) if result.browser_node is not None else result.output_node
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        for view, plane in LAX_VIEWS.items():
            if view == "Green" and "user" in result.planes:
                plane = "user"
            slice_node = slicer.app.layoutManager().sliceWidget(view).mrmlSliceNode()
            if plane in result.planes:
                mrml.orient_slice_node(slice_node, result.planes[plane], result.parent_transform)
            else:
                # No planes (no segmentation): show the stack's own planes, not an oblique reslice of it.
                slice_node.RotateToVolumePlane(volume)
        if result.segmentation_node is not None:
            result.segmentation_node.GetDisplayNode().SetVisibility3D(True)
        if result.chart_node is not None:
            mrml.show_function(slicer.mrmlScene, result.chart_node, result.summary_table_node)
        if manager.threeDWidget(0) is not None:
            manager.threeDWidget(0).threeDView().resetFocalPoint()  # the surfaces in the middle of the 3D view
        if result.browser_node is not None:
            slicer.modules.sequences.showSequenceBrowser(result.browser_node)  # play / step the frames from the toolbar

    def ejection_fractions(self, result: Any) -> str:
        """``"; LV EF 58 % (dense), 55 % (acquired (Simpson))"`` for the status line, or ""."""
        import math

        values = [f"{f.summary['lv_ef_percent']:.0f} % ({method})" for method, f in result.function.items() if math.isfinite(f.summary.get("lv_ef_percent", math.nan))]
        return f"; LV EF {', '.join(values)}" if values else ""

    def sequence_of(self, node: Any) -> Any:
        """The sequence behind a browser's proxy volume (so that a cine is processed whole), else the node."""
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForProxyNode(node) if node is not None else None
        return browser.GetSequenceNode(node) if browser is not None else node

    def current_frame(self, node: Any) -> int:
        """The frame the browser shows, whether ``node`` is the proxy volume or the sequence itself."""
        if node is None:
            return 0
        sequences = slicer.modules.sequences.logic()
        browser = sequences.GetFirstBrowserNodeForProxyNode(node)
        if browser is None and node.IsA("vtkMRMLSequenceNode"):
            browser = sequences.GetFirstBrowserNodeForSequenceNode(node)
        return int(browser.GetSelectedItemNumber()) if browser is not None else 0

    def cuda_devices(self) -> list[tuple[int, str]]:
        from CaLIDSlicerLib.dependencies import cuda_devices

        return cuda_devices()

    def installed_models(self) -> list[str]:
        try:
            from calid.models.registry import registered_models

            return [m.name for m in registered_models() if m.kind == "calid"]
        except Exception:  # not installed yet, or an unreadable registry (reported when a run uses it)
            return []


class CaLIDSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside real Slicer: the blocking Logic call on the phantom with an untrained tiny network."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        import importlib.util

        if importlib.util.find_spec("calid") is None or importlib.util.find_spec("torch") is None:
            # The extension build servers never run the first-use installer: nothing to test there.
            self.delayDisplay("CaLID test skipped: calid and PyTorch are not installed (open the module once to install them)")
            return
        self.setUp()
        self.test_blocking_call_on_phantom()
        self.setUp()
        self.test_parameter_node_round_trip()

    def test_blocking_call_on_phantom(self) -> None:
        from calid.data.phantom import PhantomConfig, make_phantom
        from CaLIDSlicerLib import mrml
        from CaLIDSlicerLib.logic import UpsamplingOptions

        phantom = make_phantom(0, PhantomConfig(n_frames=2, matrix=64, pixel_spacing_mm=3.0))
        sequence, _ = mrml.sequence_from_stack(slicer.mrmlScene, phantom.sparse, "phantom")
        result = CaLIDSlicerLogic().process(sequence, UpsamplingOptions(factor=2, steps=2, model="untrained:tiny", device="cpu"))
        dense = mrml.stack_from_sequence(result.output_node)
        self.assertEqual(dense.n_slices, 2 * phantom.sparse.n_slices - 1)
        self.assertTrue((abs(dense.data[:, ::2] - phantom.sparse.data) <= 0.5).all())
        self.assertIn("4-chamber", result.planes)
        self.delayDisplay("CaLID test passed")

    def test_parameter_node_round_trip(self) -> None:
        from CaLIDSlicerLib.parameters import FrameSelection, Method, PlaceholderSpacing, options_from_parameters

        parameters = CaLIDSlicerLogic().getParameterNode()
        parameters.factor, parameters.method, parameters.frames, parameters.frameRange = 8, Method.CALID_PLUS, FrameSelection.RANGE, "1-3"
        parameters.placeholderSpacing, parameters.placeholderPixelMm = PlaceholderSpacing.CUSTOM, 1.5
        again = CaLIDSlicerLogic().getParameterNode()  # the same scene node, read back typed
        self.assertEqual((again.factor, again.method, again.frames, again.placeholderSpacing), (8, Method.CALID_PLUS, FrameSelection.RANGE, PlaceholderSpacing.CUSTOM))
        options = options_from_parameters(again)
        self.assertEqual((options.factor, options.mode, options.frames, options.placeholder_spacing), (8, "calid+", "1-3", "1.5"))

