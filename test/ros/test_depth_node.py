"""depth_node: depth image, cloud and scan from camera frames; real-time dropping, bad input, model hot swap."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

OPTICAL = "camera_color_optical_frame"


class FormulaEngine:
    """Stand-in for a DepthEngine: depth from the red channel, 1 m (red 0) to 6 m (red 255), optionally slow."""

    backend = "formula"

    def __init__(self, version: str = "formula-1", sleep_s: float = 0.0) -> None:
        self.model_version = version
        self.sleep_s = sleep_s
        self.input_hw = (64, 96)
        self.last_latency_ms = float("nan")
        self.seen: list[np.ndarray] = []

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        self.seen.append(rgb[0, 0].copy())
        t0 = time.perf_counter()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return (1.0 + rgb[..., 0].astype(np.float32) / 255.0 * 5.0).astype(np.float32)


def formula_loader(engines: dict[str, FormulaEngine]):
    """Loader that knows the paths in ``engines`` and refuses any other like load_engine does."""
    from forest_perception.inference import ModelLoadError

    def load(path, backend, providers, threads):
        if path not in engines:
            raise ModelLoadError(f"model file {path!r} does not exist")
        return engines[path]

    return load


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """Two tiny auto-encoders (different weights) exported to ONNX: (path_a, path_b).

    Untrained, a network predicts about one depth everywhere, which depth_node rightly refuses; the
    weights are scaled up so that the depth follows the image, as a trained model's does.
    """
    torch = pytest.importorskip("torch")
    from forest_perception.models.networks import build_model

    out = tmp_path_factory.mktemp("onnx")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("autoencoder", input_hw=(64, 96)).eval()
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(1.5)
        path = out / f"auto_{seed}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the TorchScript exporter: 10x faster to run than the dynamo one for a test fixture
            torch.onnx.export(
                model, (torch.rand(1, 3, 64, 96),), str(path), dynamo=False, input_names=["image"],
                output_names=["depth"],
            )
        paths.append(str(path))
    return tuple(paths)


def _params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def _image(array: np.ndarray, encoding: str, stamp_s: float = 1.0):
    from forest_perception import msgs

    return msgs.image_from_array(array, encoding, msgs.time_from_sec(stamp_s), OPTICAL)


def _diag(array) -> dict[str, str]:
    return {kv.key: kv.value for kv in array.status[0].values}


def test_starts_without_a_model_and_reports_error(rclpy_context, wait):
    from diagnostic_msgs.msg import DiagnosticStatus

    from forest_perception.nodes.depth_node import DepthNode

    node = DepthNode(context=rclpy_context, parameter_overrides=_params(model_path="/nonexistent/model.onnx"))
    try:
        level, message, values = node.diagnostics_values()
        assert level == DiagnosticStatus.ERROR and "/nonexistent/model.onnx" in message
        node._on_image(_image(np.zeros((12, 16, 3), np.uint8), "rgb8"))
        assert wait(lambda: node.counts["skipped"] == 1)  # nothing to run it on
        assert node.counts["processed"] == 0
        # a valid model brings it up
        engines = {"/models/good.onnx": FormulaEngine("good-1")}
        node._loader = formula_loader(engines)
        from rclpy.parameter import Parameter

        assert node.set_parameters([Parameter("model_path", value="/models/good.onnx")])[0].successful
        node._on_image(_image(np.zeros((12, 16, 3), np.uint8), "rgb8"))
        assert wait(lambda: node.counts["processed"] == 1)
        level, _, values = node.diagnostics_values()
        assert values["model_version"] == "good-1" and level != DiagnosticStatus.ERROR
    finally:
        node.destroy_node()


def test_bad_images_are_dropped_and_counted(rclpy_context, wait):
    from forest_perception.nodes.depth_node import DepthNode

    engine = FormulaEngine()
    node = DepthNode(
        engine_loader=formula_loader({"m": engine}), context=rclpy_context, parameter_overrides=_params(model_path="m")
    )
    try:
        good = np.zeros((12, 16, 3), np.uint8)
        good[..., 0] = 200  # red
        wrong_step = _image(good, "rgb8")
        wrong_step.step = 16 * 3 + 5
        short = _image(good, "rgb8")
        short.data = bytes(short.data)[:-7]
        empty = _image(good, "rgb8")
        empty.height, empty.width, empty.step, empty.data = 0, 0, 0, b""
        unknown = _image(good, "rgb8")
        unknown.encoding = "yuv422_weird"
        depth16 = _image(np.zeros((12, 16), np.uint16), "16UC1")  # known encoding, not a colour image
        for bad in (wrong_step, short, empty, unknown, depth16):
            node._on_image(bad)
        assert node.counts["malformed"] == 5 and node.counts["received"] == 0
        assert "encoding" in node.last_error

        # every colour encoding reaches the engine as RGB with red first
        bgr = good[..., ::-1].copy()
        for array, encoding in (
            (good, "rgb8"),
            (bgr, "bgr8"),
            (np.dstack([good, np.full((12, 16), 255, np.uint8)]), "rgba8"),
            (np.dstack([bgr, np.full((12, 16), 255, np.uint8)]), "bgra8"),
        ):
            node._on_image(_image(array, encoding))
            n = len(engine.seen)
            assert wait(lambda n=n: len(engine.seen) == n + 1), encoding
            assert list(engine.seen[-1]) == [200, 0, 0], encoding
        node._on_image(_image(np.full((12, 16), 77, np.uint8), "mono8"))
        assert wait(lambda: len(engine.seen) == 5)
        assert list(engine.seen[-1]) == [77, 77, 77]
        assert wait(lambda: node.counts["processed"] == 5)
        _, _, values = node.diagnostics_values()
        assert values["frames_malformed"] == 5 and values["frames_processed"] == 5
        assert node.worker.alive
    finally:
        node.destroy_node()


def test_model_hot_swap_is_atomic_and_refuses_bad_files(rclpy_context, onnx_models, tmp_path, wait):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.depth_node import DepthNode

    path_a, path_b = onnx_models
    node = DepthNode(context=rclpy_context, parameter_overrides=_params(model_path=path_a))
    try:
        first = node.diagnostics_values()[2]["model_version"]
        assert first and first != "unknown" and node.diagnostics_values()[2]["backend"] == "onnxruntime"
        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(b"this is not an onnx model" * 10)
        result = node.set_parameters([Parameter("model_path", value=str(corrupt))])[0]
        assert not result.successful and "corrupt.onnx" in result.reason
        missing = node.set_parameters([Parameter("model_path", value=str(tmp_path / "none.onnx"))])[0]
        assert not missing.successful and "does not exist" in missing.reason
        assert node.get_parameter("model_path").value == path_a
        # the old model still runs
        node._on_image(_image(np.full((120, 160, 3), 90, np.uint8), "rgb8"))
        assert wait(lambda: node.counts["processed"] == 1, timeout=10.0)
        assert node.diagnostics_values()[2]["model_version"] == first

        assert node.set_parameters([Parameter("model_path", value=path_b)])[0].successful
        second = node.diagnostics_values()[2]["model_version"]
        assert second != first
        node._on_image(_image(np.full((120, 160, 3), 90, np.uint8), "bgr8"))
        assert wait(lambda: node.counts["processed"] == 2, timeout=10.0)
        bad_range = node.set_parameters([Parameter("min_depth_m", value=50.0)])[0]
        assert not bad_range.successful and "min_depth_m" in bad_range.reason
        assert not node.set_parameters([Parameter("threads", value=99)])[0].successful  # outside 1..16
    finally:
        node.destroy_node()


@pytest.mark.slow
def test_with_sim_node_end_to_end(rclpy_context, onnx_models, spin):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image, LaserScan, PointCloud2

    from forest_perception import msgs
    from forest_perception.nodes.depth_node import DepthNode
    from forest_perception.nodes.sim_node import SimNode

    sim = SimNode(
        context=rclpy_context,
        parameter_overrides=_params(
            world_size_m=24.0, camera_width=160, camera_height=120, render_workers=0, seed=3, real_time_factor=1.0
        ),
    )
    depth = DepthNode(
        context=rclpy_context,
        namespace="rover_0",
        parameter_overrides=_params(model_path=onnx_models[0], use_sim_time=True, max_depth_m=20.0),
    )
    topics = {
        "/rover_0/camera/image_raw": Image,
        "/rover_0/depth/image": Image,
        "/rover_0/depth/points": PointCloud2,
        "/rover_0/depth/scan": LaserScan,
        "/diagnostics": DiagnosticArray,
    }
    try:
        got = spin([sim, depth], 5.0, topics)
    finally:
        depth.destroy_node()
        sim.destroy_node()
    images, depths = got["/rover_0/camera/image_raw"], got["/rover_0/depth/image"]
    assert images and depths and got["/rover_0/depth/points"] and got["/rover_0/depth/scan"]
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in images}
    # the listener may join after the depth node saw the first frames: compare from its first image on
    later = [m for m in depths if (m.header.stamp.sec, m.header.stamp.nanosec) >= min(stamps)]
    assert later
    for m in later:
        assert (m.header.stamp.sec, m.header.stamp.nanosec) in stamps
    for m in depths:
        assert m.header.frame_id == OPTICAL and m.encoding == "32FC1"
        assert (m.width, m.height) == (160, 120) and m.step == 160 * 4
    d = msgs.array_from_image(depths[-1])
    assert np.isfinite(d).any() and not np.isinf(d).any()
    cloud = got["/rover_0/depth/points"][-1]
    assert cloud.header.frame_id == OPTICAL and cloud.width > 0 and cloud.is_dense
    points = msgs.array_from_pointcloud2(cloud)
    assert (points[:, 2] > 0).all()
    scan = got["/rover_0/depth/scan"][-1]
    assert scan.header.frame_id == "camera_link" and scan.angle_min < 0 < scan.angle_max
    assert len(scan.ranges) == round((scan.angle_max - scan.angle_min) / scan.angle_increment) + 1
    ours = [a for a in got["/diagnostics"] if a.status and a.status[0].name.startswith("depth_node")]
    assert ours, "no depth_node diagnostics"
    values = _diag(ours[-1])
    assert ours[-1].status[0].name == "depth_node: rover_0"
    assert ours[-1].status[0].level == b"\x00", ours[-1].status[0].message
    for key in (
        "rate_hz", "latency_ms_p50", "latency_ms_p95", "inference_ms_p50", "stamp_to_publish_ms_p95",
        "frames_processed", "frames_skipped", "frames_malformed", "last_error", "model_version", "backend",
    ):
        assert key in values, key
    assert float(values["rate_hz"]) > 3.0 and int(values["frames_processed"]) >= 5
    assert values["backend"] == "onnxruntime" and values["camera_info"] == "True"
    print(
        f"depth_node with sim: {values['rate_hz']} Hz, receive->publish p50 {values['latency_ms_p50']} ms "
        f"p95 {values['latency_ms_p95']} ms, stamp->publish p50 {values['stamp_to_publish_ms_p50']} ms, "
        f"inference p50 {values['inference_ms_p50']} ms, skipped {values['frames_skipped']}"
    )


@pytest.mark.slow
def test_faster_images_than_inference_are_skipped_not_queued(rclpy_context, spin):
    from sensor_msgs.msg import Image

    from forest_perception.nodes.depth_node import DepthNode

    engine = FormulaEngine(sleep_s=0.1)
    node = DepthNode(
        engine_loader=formula_loader({"slow": engine}),
        context=rclpy_context,
        parameter_overrides=_params(model_path="slow"),
    )
    from rclpy.qos import qos_profile_sensor_data

    state = {"pub": None, "next": time.monotonic(), "sent": 0}
    array = np.zeros((120, 160, 3), np.uint8)

    def publish(listener):
        if state["pub"] is None:
            state["pub"] = listener.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        now = time.monotonic()
        if now >= state["next"]:
            state["next"] += 1.0 / 30.0
            stamp = node.get_clock().now().nanoseconds * 1e-9
            state["pub"].publish(_image(array, "rgb8", stamp))
            state["sent"] += 1

    try:
        got = spin([node], 3.0, {"depth/image": Image}, step=publish)
        time.sleep(0.3)
        counts = dict(node.counts)
        _, _, values = node.diagnostics_values()
    finally:
        node.destroy_node()
    assert state["sent"] >= 60 and counts["received"] >= 40
    assert counts["processed"] <= 3.0 / 0.1 + 2  # one at a time, 100 ms each
    # every frame was either processed or replaced by a newer one; none waits in a queue
    assert counts["received"] == counts["processed"] + counts["skipped"]
    assert counts["skipped"] >= counts["received"] // 2
    # a queue would make the latency grow to seconds; the newest frame waits at most one inference
    assert values["latency_ms_p95"] < 400.0 and values["stamp_to_publish_ms_p95"] < 400.0
    assert len(got["depth/image"]) >= 10


def test_an_onnx_that_is_no_depth_network_is_refused_before_the_swap(rclpy_context, onnx_models, tmp_path):
    torch = pytest.importorskip("torch")
    from rclpy.parameter import Parameter

    from forest_perception.nodes.depth_node import DepthNode

    class AllNaN(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] * float("nan")

    refused = {}
    for name, module in (("conv", torch.nn.Conv2d(3, 1, 3, padding=1)), ("nan", AllNaN())):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (torch.rand(1, 3, 64, 96),), str(path), dynamo=False,
                              input_names=["image"], output_names=["depth"])
        refused[name] = str(path)
    node = DepthNode(context=rclpy_context, parameter_overrides=_params(model_path=onnx_models[0]))
    try:
        running = node.diagnostics_values()[2]["model_version"]
        for name, path in refused.items():
            result = node.set_parameters([Parameter("model_path", value=path)])[0]
            assert not result.successful and "reference frame" in result.reason, (name, result.reason)
            assert node.get_parameter("model_path").value == onnx_models[0]
            assert node.diagnostics_values()[2]["model_version"] == running
    finally:
        node.destroy_node()


def test_with_no_parameters_it_runs_the_shipped_model_that_fits_the_camera(rclpy_context, wait):
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.parameter import Parameter

    from forest_perception.models.weights import default_family, shipped_model
    from forest_perception.nodes.depth_node import DepthNode

    node = DepthNode(context=rclpy_context)  # ros2 run forest_perception depth_node: no parameters at all
    try:
        level, message, values = node.diagnostics_values()
        assert level == DiagnosticStatus.OK and "waiting for the first camera frame" in message
        assert values["model_file"] == ""
        frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        node._on_image(_image(frame, "rgb8"))
        assert wait(lambda: node.counts["processed"] == 1, timeout=30)
        _, _, values = node.diagnostics_values()
        # a 320x240 camera, CPU only: this board's family (multi-scale on x86, auto-encoder on a Pi), int8, 320x240
        chosen = str(shipped_model(f"{default_family()}_320x240_int8"))
        assert values["model_file"] == chosen
        assert values["model_version"] and values["backend"] == "onnxruntime"
        # the choice is written into model_path: ros2 param get and collab_node's gate see the file that runs
        assert node.get_parameter("model_path").value == chosen
        # back to empty with another family: chosen again for the last frame's size, checked like any hot swap
        assert node.set_parameters([Parameter("model_path", value=""),
                                    Parameter("model_family", value="autoencoder")])[0].successful
        assert node.diagnostics_values()[2]["model_file"] == str(shipped_model("autoencoder_320x240_int8"))
        node._on_image(_image(frame, "rgb8"))  # the next frame writes that choice into model_path too
        assert wait(lambda: node.get_parameter("model_path").value == str(shipped_model("autoencoder_320x240_int8")))
        # a shipped model by name, and a name that is not shipped, refused with the shipped names listed
        assert node.set_parameters([Parameter("model_path", value="autoencoder_160x128")])[0].successful
        assert node.diagnostics_values()[2]["model_file"] == str(shipped_model("autoencoder_160x128"))
        result = node.set_parameters([Parameter("model_path", value="multiscale_640x480")])[0]
        assert not result.successful and "no shipped model 'multiscale_640x480'" in result.reason
        assert "multiscale_320x240_int8" in result.reason
        assert node.diagnostics_values()[2]["model_file"] == str(shipped_model("autoencoder_160x128"))
    finally:
        node.destroy_node()


def test_shipped_model_choice_by_camera_family_and_board():
    from forest_perception.models.weights import choose_for_camera, default_family, parse_model_name

    names = ["multiscale_320x240", "multiscale_320x240_int8", "multiscale_160x128", "multiscale_160x128_int8",
             "autoencoder_320x240_int8", "autoencoder_160x128", "notes", "multiscale_big"]
    assert parse_model_name("multiscale_160x128_int8") == ("multiscale", 160, 128, True)
    assert parse_model_name("multiscale_big") is None
    assert choose_for_camera(names, 640, 480, "multiscale", True) == "multiscale_320x240_int8"
    assert choose_for_camera(names, 320, 240, "multiscale", False) == "multiscale_320x240"
    assert choose_for_camera(names, 200, 150, "multiscale", True) == "multiscale_160x128_int8"  # no upscaling
    assert choose_for_camera(names, 100, 80, "multiscale", False) == "multiscale_160x128"  # smaller than all
    # the asked precision missing: the other one; the family missing at that size: still that family
    assert choose_for_camera(names, 640, 480, "autoencoder", False) == "autoencoder_320x240_int8"
    assert choose_for_camera(["multiscale_320x240"], 640, 480, "autoencoder", True) == "multiscale_320x240"
    with pytest.raises(ValueError, match="family must be one of"):
        choose_for_camera(names, 640, 480, "resnet", True)
    with pytest.raises(ValueError, match="camera size must be positive"):
        choose_for_camera(names, 0, 480, "multiscale", True)
    with pytest.raises(ValueError, match="no shipped model"):
        choose_for_camera(["notes"], 640, 480, "multiscale", True)
    assert default_family("aarch64") == "autoencoder"  # a Raspberry Pi 4
    assert default_family("aarch64", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "multiscale"  # a Jetson
    assert default_family("x86_64") == "multiscale"


def test_a_hot_swap_during_the_choice_for_the_camera_wins(rclpy_context):
    from rclpy.parameter import Parameter

    from forest_perception.nodes.depth_node import DepthNode

    node = DepthNode(engine_loader=formula_loader({"/models/x.onnx": FormulaEngine("x-1")}), context=rclpy_context)
    try:
        real_load, calls = node._load, []

        def racing_load(p):
            calls.append(p["model_path"])
            if len(calls) == 1:  # the worker is loading the camera's model; a user sets model_path meanwhile
                assert node.set_parameters([Parameter("model_path", value="/models/x.onnx")])[0].successful
                return FormulaEngine("auto-1"), "/shipped/auto.onnx"
            return real_load(p)

        node._load = racing_load
        node._load_for_camera(np.zeros((48, 64, 3), np.uint8))
        assert calls == ["", "/models/x.onnx"]
        _, _, values = node.diagnostics_values()
        assert values["model_version"] == "x-1" and values["model_file"] == "/models/x.onnx"
    finally:
        node.destroy_node()
