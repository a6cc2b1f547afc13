"""SDFormat element helpers for the Gazebo export: numbers as text, poses, shapes, inertia, plugins, noise.

Numbers are written with a fixed precision and no trailing zeros, so the same world gives byte-identical
files. Details: docs/simulator.md (`forest_perception.sim.gazebo`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

import numpy as np

SDF_VERSION = "1.10"
PHYSICS_STEP_S = 0.001


def num(value: float, digits: int = 4) -> str:
    """Fixed-precision number without trailing zeros and without '-0'."""
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "", "-") else text


def nums(*values: float, digits: int = 4) -> str:
    """Space-separated :func:`num` s (an SDF vector)."""
    return " ".join(num(v, digits) for v in values)


def sub(parent: ET.Element, tag: str, text: str | float | None = None, **attrs: str) -> ET.Element:
    """A child element ``<tag attrs>text</tag>`` of ``parent`` (a number as :func:`num`)."""
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text if isinstance(text, str) else num(text)
    return el


def add_pose(parent: ET.Element, x: float, y: float, z: float, roll: float = 0.0, pitch: float = 0.0,
             yaw: float = 0.0) -> ET.Element:
    """A ``<pose>`` (metres, then radians with more digits) in ``parent``."""
    return sub(parent, "pose", nums(x, y, z) + " " + nums(roll, pitch, yaw, digits=6))


def add_material(parent: ET.Element, rgb: tuple[float, float, float], specular: float = 0.05) -> None:
    """A ``<material>`` of diffuse colour ``rgb`` (ambient 60 % of it) in ``parent``."""
    mat = sub(parent, "material")
    r, g, b = rgb
    sub(mat, "ambient", nums(r * 0.6, g * 0.6, b * 0.6, 1.0, digits=3))
    sub(mat, "diffuse", nums(r, g, b, 1.0, digits=3))
    sub(mat, "specular", nums(specular, specular, specular, 1.0, digits=3))


def add_geometry(parent: ET.Element, kind: str, **params: str) -> None:
    """A ``<geometry><kind>`` with one child element per parameter in ``parent``."""
    geom = sub(sub(parent, "geometry"), kind)
    for key, value in params.items():
        sub(geom, key, value)


def add_shape(link: ET.Element, name: str, kind: str, pose: tuple[float, ...], params: dict[str, str],
              rgb: tuple[float, float, float] | None, collide: bool) -> None:
    """A visual (when ``rgb``) and/or collision of one primitive at ``pose`` in the link."""
    if rgb is not None:
        vis = sub(link, "visual", name=f"{name}_visual")
        add_pose(vis, *pose)
        add_geometry(vis, kind, **params)
        add_material(vis, rgb)
    if collide:
        col = sub(link, "collision", name=f"{name}_collision")
        add_pose(col, *pose)
        add_geometry(col, kind, **params)


def add_inertial(link: ET.Element, mass: float, ixx: float, iyy: float, izz: float,
                 pose: tuple[float, ...] | None = None) -> None:
    """An ``<inertial>`` of ``mass`` (kg) with a diagonal inertia (kg m^2) about ``pose`` in the link."""
    inertial = sub(link, "inertial")
    if pose is not None:
        add_pose(inertial, *pose)
    sub(inertial, "mass", num(mass, 6))
    inertia = sub(inertial, "inertia")
    for key, value in (("ixx", ixx), ("ixy", 0.0), ("ixz", 0.0), ("iyy", iyy), ("iyz", 0.0), ("izz", izz)):
        sub(inertia, key, num(value, 8))


def add_plugin(parent: ET.Element, filename: str, name: str, **params: str | Iterable[str]) -> ET.Element:
    """A ``<plugin>`` with one child element per parameter value (a list repeats the element)."""
    plugin = sub(parent, "plugin", filename=filename, name=name)
    for key, value in params.items():
        for item in [value] if isinstance(value, str) else value:
            sub(plugin, key, item)
    return plugin


def clip_rgb(rgb: np.ndarray) -> tuple[float, float, float]:
    """An RGB triple clipped to [0, 1], as floats."""
    r, g, b = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return float(r), float(g), float(b)


def add_frame_id(sensor: ET.Element, frame: str) -> None:
    """The sensor's frame id, under both names Gazebo versions read."""
    # Harmonic (gz-sensors 8) reads <gz_frame_id>; Ionic and later read <frame_id> and
    # deprecate the other. Each warns about the element it does not know.
    sub(sensor, "gz_frame_id", frame)
    sub(sensor, "frame_id", frame)


def add_noise(parent: ET.Element, stddev: float) -> None:
    """Zero-mean Gaussian ``<noise>`` of ``stddev`` in ``parent``."""
    noise = sub(parent, "noise", type="gaussian")
    sub(noise, "mean", "0")
    sub(noise, "stddev", num(stddev, 6))
