"""numpy <-> ROS message conversions (no rclpy context needed)."""

from __future__ import annotations

import numpy as np
import pytest

from forest_perception import msgs
from forest_perception.frames import CameraIntrinsics


@pytest.mark.parametrize(
    ("encoding", "shape", "dtype"),
    [
        ("rgb8", (5, 7, 3), np.uint8),
        ("bgra8", (5, 7, 4), np.uint8),
        ("mono8", (5, 7), np.uint8),
        ("16UC1", (5, 7), np.uint16),
        ("32FC1", (5, 7), np.float32),
    ],
)
def test_image_round_trip(encoding, shape, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random(shape) * 200).astype(dtype)
    msg = msgs.image_from_array(array, encoding, msgs.time_from_sec(12.5), "cam")
    assert msg.step == shape[1] * (shape[2] if len(shape) == 3 else 1) * np.dtype(dtype).itemsize
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 500_000_000)
    back = msgs.array_from_image(msg)
    assert back.dtype == dtype and np.array_equal(back, array)


def test_nan_depth_survives():
    depth = np.array([[1.0, np.nan], [0.5, 2.0]], dtype=np.float32)
    back = msgs.array_from_image(msgs.image_from_array(depth, "32FC1", msgs.time_from_ns(0), "cam"))
    assert np.isnan(back[0, 1]) and back[1, 0] == 0.5


def test_padded_rows_are_read():
    msg = msgs.image_from_array(np.zeros((2, 3), np.uint8), "mono8", msgs.time_from_ns(0), "c")
    msg.step = 4
    msg.data = bytes([1, 2, 3, 99, 4, 5, 6, 99])
    assert msgs.array_from_image(msg).tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda m: setattr(m, "step", 2), "step"),
        (lambda m: setattr(m, "data", bytes(5)), "bytes"),
        (lambda m: (setattr(m, "width", 0), setattr(m, "data", b"")), "empty"),
        (lambda m: setattr(m, "encoding", "yuv422_yuy2"), "encoding"),
    ],
)
def test_malformed_images_are_refused(mutate, words):
    msg = msgs.image_from_array(np.zeros((2, 3), np.uint8), "mono8", msgs.time_from_ns(0), "c")
    mutate(msg)
    with pytest.raises(ValueError, match=words):
        msgs.array_from_image(msg)


def test_wrong_array_for_encoding_is_refused():
    with pytest.raises(ValueError, match="rgb8"):
        msgs.image_from_array(np.zeros((4, 4), np.uint8), "rgb8", msgs.time_from_ns(0), "c")
    with pytest.raises(ValueError, match="float32"):
        msgs.image_from_array(np.zeros((4, 4), np.float64), "32FC1", msgs.time_from_ns(0), "c")


def test_camera_info_matches_intrinsics():
    cam = CameraIntrinsics(640, 480, 69.4)
    info = msgs.camera_info_from_intrinsics(cam, msgs.time_from_ns(5), "camera_color_optical_frame")
    k = np.array(info.k).reshape(3, 3)
    assert np.allclose(k, cam.k)
    assert info.p[0] == cam.fx and info.p[3] == 0.0 and info.distortion_model == "plumb_bob"


def test_time_conversions():
    assert msgs.stamp_to_sec(msgs.time_from_sec(3.000000001)) == pytest.approx(3.000000001)
    with pytest.raises(ValueError):
        msgs.time_from_ns(-1)
    with pytest.raises(ValueError):
        msgs.time_from_sec(float("nan"))


def test_pointcloud2_round_trip():
    points = np.array([[0.0, 1.0, 2.0], [-1.5, 0.25, 3.0]], dtype=np.float32)
    msg = msgs.pointcloud2_msg(points, msgs.time_from_sec(3.0), "camera_color_optical_frame")
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [("x", 0, 7), ("y", 4, 7), ("z", 8, 7)]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 2, 12, 24)
    assert msg.is_dense and not msg.is_bigendian and len(msg.data) == 24
    assert np.array_equal(msgs.array_from_pointcloud2(msg), points)
    empty = msgs.pointcloud2_msg(np.zeros((0, 3), np.float32), msgs.time_from_sec(0.0), "f")
    assert empty.width == 0 and msgs.array_from_pointcloud2(empty).shape == (0, 3)
    with pytest.raises(ValueError, match="N, 3"):
        msgs.pointcloud2_msg(np.zeros((4, 2)), msgs.time_from_sec(0.0), "f")


def test_laserscan_angle_max_follows_the_ranges():
    ranges = np.array([1.0, np.inf, 2.0], dtype=np.float32)
    msg = msgs.laserscan_msg(msgs.time_from_sec(1.0), "camera_link", ranges, -0.1, 0.1, 0.28, 10.0)
    assert msg.angle_max == pytest.approx(0.1) and msg.header.frame_id == "camera_link"
    assert list(msg.ranges)[1] == float("inf") and (msg.range_min, msg.range_max) == pytest.approx((0.28, 10.0))


def test_camera_matrix_from_info():
    info = msgs.camera_info_from_intrinsics(CameraIntrinsics(160, 120, 69.4), msgs.time_from_sec(0.0), "cam")
    K = msgs.camera_matrix_from_info(info)
    assert K.shape == (3, 3) and K[0, 0] == pytest.approx(CameraIntrinsics(160, 120, 69.4).fx)
    info.k = [0.0] * 9
    with pytest.raises(ValueError, match="no usable K"):
        msgs.camera_matrix_from_info(info)
