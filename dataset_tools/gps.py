"""GPS fixes of a dataset in local east/north metres, for spacing, GPS-cell splits and track plots."""

from __future__ import annotations

import numpy as np


def local_enu(
    latitude: np.ndarray, longitude: np.ndarray, origin: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """East and north metres of WGS84 fixes in a local tangent plane (NaN in, NaN out).

    ``origin`` (latitude, longitude) defaults to the first finite fix; returns (east, north,
    origin), origin None when there is no fix at all.
    """
    import pymap3d

    lat = np.asarray(latitude, np.float64)
    lon = np.asarray(longitude, np.float64)
    finite = np.isfinite(lat) & np.isfinite(lon)
    if origin is None:
        if not finite.any():
            return np.full(lat.shape, np.nan), np.full(lat.shape, np.nan), None
        first = int(np.argmax(finite))
        origin = (float(lat[first]), float(lon[first]))
    east, north, _ = pymap3d.geodetic2enu(lat, lon, 0.0, origin[0], origin[1], 0.0)
    return np.asarray(east, np.float64), np.asarray(north, np.float64), origin
