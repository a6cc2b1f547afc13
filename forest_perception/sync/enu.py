"""GPS fixes to local ENU metres about an origin, and back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forest_perception.geo import enu_to_geodetic, geodetic_to_enu, validate_lat_lon
from forest_perception.readings import GpsFix


@dataclass(frozen=True)
class EnuPosition:
    """A position in the local ENU frame (metres) with its 3x3 covariance (m^2)."""

    east: float
    north: float
    up: float
    covariance: np.ndarray


class EnuConverter:
    """GPS fixes to local East-North-Up metres about an origin (WGS84, pymap3d).

    The origin is the given ``(lat, lon, alt)`` or, when None, the first good fix converted.
    The covariance is the fix's (NavSatFix gives it in ENU already); unknown parts get
    ``UNOBSERVED_VARIANCE``. A fix without altitude is put at the origin's height with an
    unobserved vertical variance.
    """

    UNOBSERVED_VARIANCE = 1e6

    def __init__(self, origin: tuple[float, float, float] | None = None) -> None:
        self.origin: tuple[float, float, float] | None = None
        if origin is not None:
            lat, lon, alt = (float(v) for v in origin)
            validate_lat_lon(lat, lon, prefix="origin ")
            if not math.isfinite(alt):
                raise ValueError(f"origin altitude must be finite, got {origin[2]!r}")
            self.origin = (lat, lon, alt)

    def convert(self, fix: GpsFix, covariance: Sequence[float] | None = None) -> EnuPosition:
        """ENU position of ``fix``; ``ValueError`` for a no-fix status or a position out of range."""
        if fix.status is not None and fix.status < 0:
            raise ValueError(f"gps fix has status {fix.status} (no fix)")
        validate_lat_lon(fix.latitude, fix.longitude, prefix="gps ")
        has_alt = fix.altitude is not None and math.isfinite(fix.altitude)
        if self.origin is None:
            self.origin = (float(fix.latitude), float(fix.longitude), float(fix.altitude) if has_alt else 0.0)
        lat0, lon0, alt0 = self.origin
        alt = float(fix.altitude) if has_alt else alt0
        e, n, u = geodetic_to_enu(fix.latitude, fix.longitude, alt, lat0, lon0, alt0)
        if covariance is None:
            cov = np.eye(3) * self.UNOBSERVED_VARIANCE
        else:
            cov = np.asarray(covariance, dtype=np.float64).reshape(3, 3).copy()
            if not np.isfinite(cov).all():
                raise ValueError(f"gps covariance must be finite, got {cov.ravel().tolist()}")
        if not has_alt:
            cov[2, :] = cov[:, 2] = 0.0
            cov[2, 2] = self.UNOBSERVED_VARIANCE
        return EnuPosition(float(e), float(n), float(u), cov)

    def to_geodetic(self, east: float, north: float, up: float) -> tuple[float, float, float]:
        """WGS84 (lat, lon degrees, ellipsoidal alt m) of an ENU point; needs an origin."""
        if self.origin is None:
            raise ValueError("EnuConverter has no origin yet: give one or convert a fix first")
        return enu_to_geodetic(east, north, up, *self.origin)
