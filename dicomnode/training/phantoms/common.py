"""Geometry, the X-ray model and the value object shared by the hand and spine phantoms.

Anatomy is drawn in millimetres in a *body frame* (x to the image right, y
down, before the pose is applied). A :class:`Frame` places the body frame on
the detector (scale, rotation, mirroring); a :class:`Canvas` accumulates the
thickness of soft tissue, the excess attenuation of bone and a bone-density
factor per pixel. :func:`develop` turns the attenuation line integral into a
radiograph (Beer-Lambert primary, heel effect, collimation, detector blur,
scatter, quantum noise, logarithm, window, tone curve, edge enhancement).

A lesion is drawn by changing the anatomy (or the density field) and
drawing again: :func:`change_mask` compares the two attenuation maps, so the
lesion mask is exactly where the anatomy changed. Both drawings share the
noise field, and the scatter, dynamic-range compression and window of the
lesion-free one, so the two radiographs differ only there (and within the
edge-enhancement kernel around it).

Shapes: :class:`LongBone` (tubular bones with cortex, flared and capped
ends), :class:`Solid` (ellipses and rounded rectangles, optionally with a
cortical shell), :class:`Limb` and :class:`Pad` (soft tissue), :class:`Spot`
(erosions and osteopenia as density changes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.values import FloatArray

__all__ = [
    "BODY_PARTS",
    "VIEWS",
    "BoolArray",
    "Canvas",
    "Exposure",
    "Frame",
    "Limb",
    "LongBone",
    "Materials",
    "Pad",
    "Patch",
    "Phantom",
    "Point",
    "Solid",
    "Spot",
    "change_mask",
    "develop",
    "dilate",
    "erode",
    "gaussian_blur",
    "rng_for",
    "sample_exposure",
]

BoolArray = npt.NDArray[np.bool_]
Point = tuple[float, float]

BODY_PARTS = ("HAND", "SPINE")
"""Values of :attr:`Phantom.body_part`."""

VIEWS = ("PA", "AP", "LAT")
"""Values of :attr:`Phantom.view`."""

MASK_THRESHOLD = 0.012
"""Attenuation change, as a share of the display window, that counts as changed anatomy."""

MASK_CLOSING_MM = 1.2
"""Radius of the morphological closing that joins the changed pixels into a lesion mask."""


# --------------------------------------------------------------------------- value object


@dataclass(frozen=True, eq=False)
class Phantom:
    """One generated radiograph with its label and lesion mask.

    Attributes
    ----------
    pixels:
        ``float32`` (rows, columns) in [0, 1], display-ready: 0 black, bone bright.
    label:
        0 normal, 1 abnormal.
    lesion_mask:
        ``bool`` array of the shape of ``pixels``: where the generator changed the
        anatomy to draw the lesion(s); all ``False`` for a normal image.
    body_part:
        ``"HAND"`` or ``"SPINE"``.
    view:
        ``"PA"`` (hand), ``"AP"`` or ``"LAT"`` (spine).
    laterality:
        ``"L"`` or ``"R"`` for a hand, ``None`` for the spine.
    lesion:
        What was drawn, e.g. ``"erosion MCP3"``, ``"wedge fracture L1"``,
        ``"scoliosis"``, ``"listhesis L4-L5"``; several joined by ``", "``;
        ``""`` when normal.
    spacing_mm:
        Pixel spacing at the detector, in millimetres.
    orientation:
        DICOM Patient Orientation (row direction, column direction).
    """

    pixels: FloatArray
    label: int
    lesion_mask: BoolArray
    body_part: str
    view: str
    laterality: str | None
    lesion: str
    spacing_mm: float
    orientation: tuple[str, str]

    def __post_init__(self) -> None:
        _check_phantom(self)
        self.pixels.setflags(write=False)
        self.lesion_mask.setflags(write=False)


def _check_phantom(p: Phantom) -> None:
    """Raise ``ValueError`` unless the fields of ``p`` agree with each other."""
    if p.pixels.ndim != 2 or p.pixels.dtype != np.float32:
        raise ValueError("pixels must be a 2-D float32 array")
    if p.lesion_mask.shape != p.pixels.shape or p.lesion_mask.dtype != np.bool_:
        raise ValueError("lesion_mask must be a bool array of the shape of pixels")
    if p.label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, not {p.label}")
    if p.body_part not in BODY_PARTS or p.view not in VIEWS:
        raise ValueError(f"unknown body part or view {p.body_part!r} {p.view!r}")
    if p.laterality not in ("L", "R", None):
        raise ValueError(f"laterality must be 'L', 'R' or None, not {p.laterality!r}")
    if bool(p.lesion_mask.any()) != bool(p.label) or bool(p.lesion) != bool(p.label):
        raise ValueError("an abnormal phantom needs a lesion and a mask; a normal one neither")


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for ``seed`` and a stream path (anatomy, pose, noise...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


# --------------------------------------------------------------------------- frame and canvas


@dataclass(frozen=True)
class Frame:
    """Where the body frame lies on a square detector.

    Attributes
    ----------
    size:
        Rows = columns of the image.
    spacing:
        Millimetres per pixel.
    centre:
        Body-frame point shown at the image centre.
    angle:
        Rotation of the body on the image, radians (positive turns +x towards +y).
    mirror:
        Mirror the body's x axis (a left hand drawn from a right-hand model).
    """

    size: int
    spacing: float
    centre: Point
    angle: float
    mirror: bool = False

    def _mirrored_centre(self) -> Point:
        return (-self.centre[0] if self.mirror else self.centre[0], self.centre[1])

    def grid(self) -> tuple[FloatArray, FloatArray]:
        """Body-frame x and y (mm) of every pixel centre."""
        half = (self.size - 1) / 2.0
        axis = ((np.arange(self.size, dtype=np.float32) - half) * self.spacing).astype(np.float32)
        px, py = axis[None, :], axis[:, None]
        cos, sin = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        cx, cy = self._mirrored_centre()
        qx = (cos * px + sin * py + np.float32(cx)).astype(np.float32)
        qy = (-sin * px + cos * py + np.float32(cy)).astype(np.float32)
        return (-qx if self.mirror else qx), qy

    def pixel_box(self, centre: Point, reach: float) -> tuple[slice, slice] | None:
        """Rows and columns covering the body-frame disc (``centre``, ``reach``), or None."""
        cx, cy = self._mirrored_centre()
        dx = (-centre[0] if self.mirror else centre[0]) - cx
        dy = centre[1] - cy
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        half = (self.size - 1) / 2.0
        col = (cos * dx - sin * dy) / self.spacing + half
        row = (sin * dx + cos * dy) / self.spacing + half
        span = reach / self.spacing + 1.0
        r0, r1 = max(0, math.floor(row - span)), min(self.size, math.ceil(row + span) + 1)
        c0, c1 = max(0, math.floor(col - span)), min(self.size, math.ceil(col + span) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


@dataclass(frozen=True, eq=False)
class Patch:
    """Pixels near a shape, in the shape's own coordinates (``u`` along its axis, mm)."""

    rows: slice
    cols: slice
    u: FloatArray
    v: FloatArray


class Canvas:
    """Per-pixel tissue accumulators of one drawing (internal to the generator).

    ``soft`` is a thickness (mm) combined by union (maximum), ``gas`` a
    thickness subtracted from it, ``bone`` the attenuation of bone in excess of
    the soft tissue it replaces, scaled by ``density`` (lesions lower it), and
    ``metal`` an attenuation no lesion touches.
    """

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.x, self.y = frame.grid()
        shape = (frame.size, frame.size)
        self.soft = np.zeros(shape, np.float32)
        self.gas = np.zeros(shape, np.float32)
        self.bone = np.zeros(shape, np.float32)
        self.density = np.ones(shape, np.float32)
        self.metal = np.zeros(shape, np.float32)

    def patch(self, centre: Point, reach: float, angle: float = 0.0) -> Patch | None:
        """The pixels within ``reach`` mm of ``centre``, with u along direction ``angle``."""
        box = self.frame.pixel_box(centre, reach)
        if box is None:
            return None
        dx = self.x[box] - np.float32(centre[0])
        dy = self.y[box] - np.float32(centre[1])
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        u = (cos * dx + sin * dy).astype(np.float32)
        v = (-sin * dx + cos * dy).astype(np.float32)
        return Patch(box[0], box[1], u, v)

    def add_bone(self, patch: Patch, attenuation: FloatArray) -> None:
        self.bone[patch.rows, patch.cols] += attenuation

    def add_soft(self, patch: Patch, thickness: FloatArray) -> None:
        region = self.soft[patch.rows, patch.cols]
        np.maximum(region, thickness, out=region)

    def add_gas(self, patch: Patch, thickness: FloatArray) -> None:
        self.gas[patch.rows, patch.cols] += thickness

    def add_metal(self, patch: Patch, attenuation: FloatArray) -> None:
        self.metal[patch.rows, patch.cols] += attenuation

    def scale_density(self, patch: Patch, factor: FloatArray) -> None:
        self.density[patch.rows, patch.cols] *= factor

    def attenuation(self, mu_soft: float) -> FloatArray:
        """The line integral of the attenuation coefficient at every pixel."""
        tissue = np.maximum(self.soft - self.gas, 0.0) * np.float32(mu_soft)
        total: FloatArray = (tissue + self.density * self.bone + self.metal).astype(np.float32)
        return total


# --------------------------------------------------------------------------- shapes


def chord(depth: float | FloatArray, inside: FloatArray, edge: float) -> FloatArray:
    """Path length through a solid ``depth`` thick whose border is rounded over ``edge`` mm.

    ``inside`` is the distance from the outline (negative outside); a circular
    profile takes the path from 0 at the outline to ``depth`` at ``edge`` inside.
    """
    x = np.clip(inside / np.float32(max(edge, 1e-3)), 0.0, 1.0)
    path: FloatArray = (np.sqrt(x * (2.0 - x)) * depth).astype(np.float32)
    return path


def box_sdf(u: FloatArray, v: FloatArray, a: float, b: float, corner: float) -> FloatArray:
    """Signed distance (mm, negative inside) to a rectangle of half sizes a, b, rounded corners."""
    corner = min(corner, a, b)
    qx = np.abs(u) - np.float32(a - corner)
    qy = np.abs(v) - np.float32(b - corner)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    sdf: FloatArray = (outside + inside - np.float32(corner)).astype(np.float32)
    return sdf


def ellipse_sdf(u: FloatArray, v: FloatArray, a: float, b: float) -> FloatArray:
    """Approximate signed distance (mm) to an ellipse of semi-axes a (along u) and b."""
    k0 = np.hypot(u / np.float32(a), v / np.float32(b))
    k1 = np.hypot(u / np.float32(a * a), v / np.float32(b * b))
    sdf: FloatArray = np.where(
        k1 > 1e-6, k0 * (k0 - 1.0) / np.maximum(k1, 1e-6), -min(a, b)
    ).astype(np.float32)
    return sdf


def segment_distance(u: FloatArray, v: FloatArray, length: float) -> FloatArray:
    """Distance (mm) to the segment from u=0 to u=length on the u axis."""
    along = u - np.clip(u, 0.0, length)
    distance: FloatArray = np.hypot(along, v).astype(np.float32)
    return distance


def polygon_sdf(x: FloatArray, y: FloatArray, vertices: tuple[Point, ...]) -> FloatArray:
    """Signed distance (mm, negative inside) to a convex polygon (vertices in either order)."""
    distance = np.full(x.shape, np.inf, np.float32)
    left = np.ones(x.shape, np.bool_)
    right = np.ones(x.shape, np.bool_)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        ex, ey = x1 - x0, y1 - y0
        length2 = max(ex * ex + ey * ey, 1e-9)
        t = np.clip(((x - x0) * ex + (y - y0) * ey) / np.float32(length2), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(x - x0 - t * ex, y - y0 - t * ey))
        cross = (x - x0) * ey - (y - y0) * ex
        left &= cross <= 0.0
        right &= cross >= 0.0
    sdf: FloatArray = np.where(left | right, -distance, distance).astype(np.float32)
    return sdf


def convex_hull(points: list[Point]) -> tuple[Point, ...]:
    """The convex hull of ``points`` (Andrew's monotone chain)."""
    ordered = sorted(set(points))

    def turn(o: Point, a: Point, b: Point) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(sequence: list[Point]) -> list[Point]:
        chain: list[Point] = []
        for point in sequence:
            while len(chain) >= 2 and turn(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    return tuple(half(ordered) + half(ordered[::-1]))


def texture_tile(rng: np.random.Generator, size: int = 128, texel_mm: float = 0.3) -> FloatArray:
    """A periodic band-pass noise tile (unit standard deviation) for trabecular texture."""
    white = rng.standard_normal((size, size))
    freq = np.fft.fftfreq(size, d=texel_mm)
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2
    band = np.exp(-2.0 * math.pi**2 * f2 * 0.5**2) - np.exp(-2.0 * math.pi**2 * f2 * 2.0**2)
    tile = np.real(np.fft.ifft2(np.fft.fft2(white) * band))
    tile /= max(float(tile.std()), 1e-9)
    result: FloatArray = tile.astype(np.float32)
    return result


def sample_tile(tile: FloatArray, u: FloatArray, v: FloatArray, offset: Point) -> FloatArray:
    """Nearest-neighbour look-up of a periodic tile at body-attached coordinates (mm)."""
    size = tile.shape[0]
    texel = 0.3
    iu = np.floor(u / np.float32(texel) + np.float32(offset[0])).astype(np.int64) % size
    iv = np.floor(v / np.float32(texel) + np.float32(offset[1])).astype(np.int64) % size
    values: FloatArray = tile[iv, iu]
    return values


# --------------------------------------------------------------------------- anatomy primitives


@dataclass(frozen=True)
class Materials:
    """Linear attenuation coefficients (per mm) and trabecular texture strength.

    ``cortex`` and ``trabecular`` are in excess of the soft tissue the bone replaces.
    """

    soft: float
    cortex: float
    trabecular: float
    texture: float = 0.25


def direction(angle: float) -> Point:
    """Unit vector of ``angle`` (radians; -pi/2 points up the image)."""
    return math.cos(angle), math.sin(angle)


def along(origin: Point, angle: float, distance: float) -> Point:
    """The point ``distance`` mm from ``origin`` in direction ``angle``."""
    dx, dy = direction(angle)
    return origin[0] + distance * dx, origin[1] + distance * dy


@dataclass(frozen=True)
class LongBone:
    """A tubular bone: cortex around a trabecular core, flared base and head, capped ends.

    ``u`` runs along ``angle`` from ``origin``; the shaft spans ``start`` to
    ``end`` and the caps (semi-axes ``base_cap`` x base radius and ``head_cap``
    x head radius) extend beyond. The base flare peaks at u = 0 and the head
    flare at u = ``nominal`` (normally ``start`` = 0 and ``end`` = ``nominal``),
    so moving ``start`` below 0 or ``end`` beyond ``nominal`` lengthens only
    that articular end.
    """

    name: str
    origin: Point
    angle: float
    start: float
    end: float
    nominal: float
    base: float
    shaft: float
    head: float
    base_cap: float
    head_cap: float
    cortex: float
    density: float = 1.0
    texture: Point = (0.0, 0.0)
    flare: float = 0.2

    def tip(self, distal: bool) -> Point:
        """Body-frame point of the distal (head) or proximal (base) extremity."""
        if distal:
            return along(self.origin, self.angle, self.end + self.head_cap * self.head)
        return along(self.origin, self.angle, self.start - self.base_cap * self.base)

    def radius_at(self, u: float) -> float:
        """Outer radius (mm) at ``u`` (inside the shaft)."""
        width = self.flare * self.nominal
        eb = math.exp(-((max(u, 0.0) / width) ** 2))
        eh = math.exp(-((max(self.nominal - u, 0.0) / width) ** 2))
        return self.shaft + (self.base - self.shaft) * eb + (self.head - self.shaft) * eh


def _capped_chord(
    radius: FloatArray, v: FloatArray, over: FloatArray, cap: FloatArray
) -> FloatArray:
    """Path through a tube of ``radius`` ending in a half-ellipsoid cap of axial length ``cap``."""
    squared = radius * radius - v * v - (over * radius / np.maximum(cap, 0.2)) ** 2
    path: FloatArray = (2.0 * np.sqrt(np.maximum(squared, 0.0))).astype(np.float32)
    return path


def draw_long_bone(canvas: Canvas, bone: LongBone, tile: FloatArray, mu: Materials) -> None:
    """Add the bone's attenuation (cortex and textured trabecular core) to ``canvas``."""
    middle = (bone.start + bone.end) / 2.0
    reach = (bone.end - bone.start) / 2.0 + 2.0 * max(bone.base, bone.head) + 1.0
    patch = canvas.patch(along(bone.origin, bone.angle, middle), reach, bone.angle)
    if patch is None:
        return
    u = patch.u + np.float32(middle)
    width = np.float32(bone.flare * bone.nominal)
    eb = np.exp(-((np.maximum(u, 0.0) / width) ** 2))
    eh = np.exp(-((np.maximum(bone.nominal - u, 0.0) / width) ** 2))
    radius = bone.shaft + (bone.base - bone.shaft) * eb + (bone.head - bone.shaft) * eh
    cortex = 0.45 + (bone.cortex - 0.45) * np.clip(1.0 - eb - eh, 0.0, 1.0)
    inner = np.maximum(radius - cortex, 0.2)
    before = np.maximum(bone.start - u, 0.0)
    beyond = np.maximum(u - bone.end, 0.0)
    over = before + beyond
    cap = np.where(before > 0, bone.base_cap * bone.base, bone.head_cap * bone.head)
    outer_path = _capped_chord(radius, patch.v, over, cap.astype(np.float32))
    inner_path = _capped_chord(inner, patch.v, over, (cap - 0.45).astype(np.float32))
    texture = sample_tile(tile, u, patch.v, bone.texture)
    canvas.add_bone(patch, _bone_attenuation(outer_path, inner_path, texture, bone.density, mu))


def _bone_attenuation(
    outer: FloatArray, inner: FloatArray, texture: FloatArray, density: float, mu: Materials
) -> FloatArray:
    trabecular = inner * (1.0 + np.float32(mu.texture) * texture)
    result: FloatArray = (
        np.float32(density) * (mu.cortex * (outer - inner) + mu.trabecular * trabecular)
    ).astype(np.float32)
    return result


@dataclass(frozen=True)
class Solid:
    """An ellipse (``corner`` None) or rounded rectangle seen through ``depth`` mm of bone.

    ``edge`` rounds the thickness profile (``min(a, b)`` gives an ellipsoid,
    a small value a flat plate or a tube seen end-on); ``cortex`` > 0 draws a
    cortical shell around a textured trabecular core.
    """

    centre: Point
    a: float
    b: float
    depth: float
    edge: float
    angle: float = 0.0
    cortex: float = 0.0
    corner: float | None = None
    density: float = 1.0
    texture: Point = (0.0, 0.0)

    def sdf(self, u: FloatArray, v: FloatArray, inset: float = 0.0) -> FloatArray:
        a, b = max(self.a - inset, 0.3), max(self.b - inset, 0.3)
        if self.corner is None:
            return ellipse_sdf(u, v, a, b)
        return box_sdf(u, v, a, b, max(self.corner - inset, 0.0))


def draw_solid(canvas: Canvas, solid: Solid, tile: FloatArray, mu: Materials) -> None:
    """Add a :class:`Solid` of bone to ``canvas``."""
    patch = canvas.patch(solid.centre, math.hypot(solid.a, solid.b) + 1.0, solid.angle)
    if patch is None:
        return
    outer = chord(solid.depth, -solid.sdf(patch.u, patch.v), solid.edge)
    if solid.cortex > 0:
        c = solid.cortex
        inner = chord(solid.depth - 2 * c, -solid.sdf(patch.u, patch.v, c), solid.edge - c)
    else:
        inner = outer
    texture = sample_tile(tile, patch.u, patch.v, solid.texture)
    canvas.add_bone(patch, _bone_attenuation(outer, inner, texture, solid.density, mu))


@dataclass(frozen=True)
class Limb:
    """Soft tissue around a segment: ``radius`` wide, ``depth`` thick in the middle."""

    start: Point
    end: Point
    radius: float
    depth: float


def draw_limb(canvas: Canvas, limb: Limb) -> None:
    """Union the limb's soft-tissue thickness into ``canvas``."""
    dx, dy = limb.end[0] - limb.start[0], limb.end[1] - limb.start[1]
    length = math.hypot(dx, dy)
    angle = math.atan2(dy, dx)
    centre = ((limb.start[0] + limb.end[0]) / 2.0, (limb.start[1] + limb.end[1]) / 2.0)
    patch = canvas.patch(centre, length / 2.0 + limb.radius + 1.0, angle)
    if patch is None:
        return
    distance = segment_distance(patch.u + np.float32(length / 2.0), patch.v, length)
    ratio = np.minimum(distance / np.float32(limb.radius), 1.0)
    canvas.add_soft(patch, (limb.depth * np.sqrt(1.0 - ratio * ratio)).astype(np.float32))


@dataclass(frozen=True)
class Pad:
    """Soft tissue over a convex polygon, ``depth`` thick, rounded over ``edge`` mm."""

    vertices: tuple[Point, ...]
    depth: float
    edge: float


def draw_pad(canvas: Canvas, pad: Pad) -> None:
    """Union the pad's soft-tissue thickness into ``canvas``."""
    xs = [p[0] for p in pad.vertices]
    ys = [p[1] for p in pad.vertices]
    centre = ((min(xs) + max(xs)) / 2.0, (min(ys) + max(ys)) / 2.0)
    reach = math.hypot(max(xs) - min(xs), max(ys) - min(ys)) / 2.0 + 1.0
    patch = canvas.patch(centre, reach)
    if patch is None:
        return
    local = tuple((x - centre[0], y - centre[1]) for x, y in pad.vertices)
    sdf = polygon_sdf(patch.u, patch.v, local)
    canvas.add_soft(patch, chord(pad.depth, -sdf, pad.edge))


@dataclass(frozen=True)
class Spot:
    """A change of bone density around ``centre``: a punched-out erosion or a diffuse loss.

    ``depth`` is the share of bone removed at the centre; ``sharp`` spots keep
    it to the rim (an erosion), others fall off smoothly to 0 at ``radius``.
    """

    centre: Point
    radius: float
    depth: float
    sharp: bool


def draw_spot(canvas: Canvas, spot: Spot) -> None:
    """Multiply the canvas' bone density by the spot's factor.

    A sharp spot is at least one pixel in radius, so that it reaches a pixel
    centre however coarse the image.
    """
    radius = max(spot.radius, canvas.frame.spacing) if spot.sharp else spot.radius
    patch = canvas.patch(spot.centre, radius + 1.0)
    if patch is None:
        return
    distance = np.hypot(patch.u, patch.v) / np.float32(radius)
    if spot.sharp:
        weight = np.clip((1.0 - distance) * radius / 0.35, 0.0, 1.0)
    else:
        weight = np.cos(np.minimum(distance, 1.0) * (math.pi / 2.0)) ** 2
    canvas.scale_density(patch, (1.0 - spot.depth * weight).astype(np.float32))


# --------------------------------------------------------------------------- filters


def _kernel_blur_axis(image: FloatArray, sigma: float, axis: int) -> FloatArray:
    radius = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="edge")
    length = image.shape[axis]
    out = np.zeros_like(image)
    for i, weight in enumerate(taps):
        part = padded[i : i + length] if axis == 0 else padded[:, i : i + length]
        out += np.float32(weight) * part
    return out


def _box_blur_axis(image: FloatArray, radius: int, axis: int) -> FloatArray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius + 1, radius)
    padded = np.pad(image.astype(np.float64), pad, mode="edge")
    total = np.cumsum(padded, axis=axis)
    width = 2 * radius + 1
    ahead = total[width:] if axis == 0 else total[:, width:]
    behind = total[:-width] if axis == 0 else total[:, :-width]
    window = ahead - behind
    result: FloatArray = (window / width).astype(np.float32)
    return result


def gaussian_blur(image: FloatArray, sigma: float) -> FloatArray:
    """Gaussian blur (``sigma`` in pixels, edges replicated); three box passes when wide."""
    if sigma < 0.25:
        return image.astype(np.float32, copy=True)
    out = image.astype(np.float32, copy=True)
    for axis in (0, 1):
        if sigma <= 4.0:
            out = _kernel_blur_axis(out, sigma, axis)
            continue
        radius = max(1, round((math.sqrt(4.0 * sigma * sigma + 1.0) - 1.0) / 2.0))
        for _ in range(3):
            out = _box_blur_axis(out, radius, axis)
    return out


def dilate(mask: BoolArray, radius: int) -> BoolArray:
    """Binary dilation by a disc of ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    rows, cols = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + rows, radius + dx : radius + dx + cols]
    return out


def erode(mask: BoolArray, radius: int) -> BoolArray:
    """Binary erosion by a disc of ``radius`` pixels (the border does not erode)."""
    return ~dilate(~mask, radius)


# --------------------------------------------------------------------------- X-ray model


@dataclass(frozen=True)
class Exposure:
    """How one radiograph is exposed, detected and processed for display.

    Attributes
    ----------
    photons:
        Quanta per pixel where nothing attenuates (sets the quantum noise).
    heel:
        Relative intensity change across the field (anode heel effect).
    heel_angle:
        Direction of the anode-cathode axis on the image, radians.
    scatter:
        Scatter generated per unit of attenuation (scatter-to-primary ratio
        over attenuation), spread by ``scatter_mm``.
    scatter_mm:
        Width (sigma) of the scatter blur, mm.
    blur_px:
        Detector and focal-spot unsharpness (sigma), pixels.
    window:
        Percentiles of the log signal (inside the field) shown black and white.
    gamma:
        Exponent of the tone curve.
    contrast:
        Strength of the S-shaped tone curve (0: linear).
    edge_gain, edge_mm:
        Unsharp-mask edge enhancement: gain and sigma (mm).
    latitude:
        Share of the large-scale log signal (over ``latitude_mm``) taken away
        before windowing (dynamic-range compression, so thin and thick parts
        both show).
    latitude_mm:
        Width (sigma) of that large scale, mm.
    body:
        Pixels whose attenuation reaches this share of the median inside the
        field set the window (0: the whole field; > 0 leaves out air).
    collimation:
        Share of the image hidden by the shutters on the top, bottom, left
        and right, or ``None`` for an open field.
    """

    photons: float
    heel: float
    heel_angle: float
    scatter: float
    scatter_mm: float
    blur_px: float
    window: tuple[float, float]
    gamma: float
    contrast: float
    edge_gain: float
    edge_mm: float
    latitude: float
    latitude_mm: float
    body: float
    collimation: tuple[float, float, float, float] | None


def sample_exposure(
    rng: np.random.Generator,
    *,
    photons: tuple[float, float],
    scatter: tuple[float, float],
    window: tuple[tuple[float, float], tuple[float, float]],
    latitude: tuple[float, float] = (0.2, 0.6),
    body: float = 0.0,
    collimate: float = 0.35,
) -> Exposure:
    """Draw an :class:`Exposure`; ranges that differ between body parts are arguments.

    ``photons`` and ``scatter`` are (low, high) ranges (photons log-uniform);
    ``window`` the ranges of the low and high percentiles; ``collimate`` the
    chance that shutters narrow the field.
    """
    shutters = None
    if rng.random() < collimate:
        shutters = tuple(float(s) for s in rng.uniform(0.0, 0.07, 4) * (rng.random(4) < 0.6))
    return Exposure(
        photons=float(np.exp(rng.uniform(math.log(photons[0]), math.log(photons[1])))),
        heel=float(rng.uniform(0.05, 0.3)),
        heel_angle=float(rng.choice([0.0, 0.5, 1.0, 1.5]) * math.pi + rng.normal(0, 0.05)),
        scatter=float(rng.uniform(*scatter)),
        scatter_mm=float(rng.uniform(15.0, 40.0)),
        blur_px=float(rng.uniform(0.4, 1.0)),
        window=(float(rng.uniform(*window[0])), float(rng.uniform(*window[1]))),
        gamma=float(np.exp(rng.normal(0.0, 0.12))),
        contrast=float(rng.uniform(0.0, 0.6)),
        edge_gain=float(rng.uniform(0.0, 0.8)),
        edge_mm=float(rng.uniform(0.8, 2.0)),
        latitude=float(rng.uniform(*latitude)),
        latitude_mm=float(rng.uniform(12.0, 30.0)),
        body=body,
        collimation=(shutters[0], shutters[1], shutters[2], shutters[3]) if shutters else None,
    )


def _heel(size: int, exposure: Exposure) -> FloatArray:
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    along = (
        math.cos(exposure.heel_angle) * axis[None, :]
        + math.sin(exposure.heel_angle) * axis[:, None]
    )
    heel: FloatArray = (1.0 + np.float32(exposure.heel) * along).astype(np.float32)
    return heel


def _field(size: int, exposure: Exposure) -> FloatArray:
    """1 inside the collimated field, a little leakage outside, soft-edged."""
    if exposure.collimation is None:
        return np.ones((size, size), np.float32)
    top, bottom, left, right = exposure.collimation
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    rows = np.clip((axis - top) * size, 0, 1) * np.clip((1.0 - bottom - axis) * size, 0, 1)
    cols = np.clip((axis - left) * size, 0, 1) * np.clip((1.0 - right - axis) * size, 0, 1)
    field: FloatArray = (0.03 + 0.97 * rows[:, None] * cols[None, :]).astype(np.float32)
    return field


def _primary(attenuation: FloatArray, exposure: Exposure) -> FloatArray:
    size = attenuation.shape[0]
    primary: FloatArray = np.exp(-attenuation) * _heel(size, exposure) * _field(size, exposure)
    return primary


def scatter_field(attenuation: FloatArray, exposure: Exposure, spacing: float) -> FloatArray:
    """Scatter reaching the detector: generated in proportion to primary x attenuation, spread."""
    generated = _primary(attenuation, exposure) * np.float32(exposure.scatter) * attenuation
    return gaussian_blur(generated, exposure.scatter_mm / spacing)


def log_signal(
    attenuation: FloatArray,
    exposure: Exposure,
    noise: FloatArray,
    scatter: FloatArray,
) -> FloatArray:
    """The detector's log signal: -ln(blurred primary + ``scatter``, with quantum noise)."""
    signal = gaussian_blur(_primary(attenuation, exposure), exposure.blur_px) + scatter
    noisy = signal + np.sqrt(signal / np.float32(exposure.photons)) * noise
    result: FloatArray = (-np.log(np.maximum(noisy, 1e-6))).astype(np.float32)
    return result


def noise_field(rng: np.random.Generator, size: int) -> FloatArray:
    """Unit-variance, slightly correlated Gaussian noise (the detector's noise texture)."""
    white = rng.standard_normal((size, size)).astype(np.float32)
    smooth = gaussian_blur(white, 0.6)
    field: FloatArray = (smooth / max(float(smooth.std()), 1e-6)).astype(np.float32)
    return field


def _window_region(attenuation: FloatArray, exposure: Exposure) -> BoolArray:
    """The pixels that set the window: inside the field and, for ``body`` > 0, the body."""
    region = _field(attenuation.shape[0], exposure) > 0.5
    if exposure.body > 0:
        level = np.float32(exposure.body * float(np.median(attenuation[region])))
        region &= attenuation >= level
    return region


def display_window(
    signal: FloatArray, region: BoolArray, window: tuple[float, float]
) -> tuple[float, float]:
    """The log-signal values shown black and white: percentiles within ``region``."""
    step = max(1, signal.shape[0] // 256)
    values = signal[::step, ::step][region[::step, ::step]]
    low, high = np.percentile(values, window)
    return float(low), float(max(high, low + 1e-3))


def display(
    signal: FloatArray, window: tuple[float, float], exposure: Exposure, spacing: float
) -> FloatArray:
    """Window, tone curve and edge enhancement: display-ready pixels in [0, 1]."""
    low, high = window
    x = np.clip((signal - np.float32(low)) / np.float32(high - low), 0.0, 1.0)
    x = x ** np.float32(exposure.gamma)
    x = x + np.float32(exposure.contrast) * x * (1.0 - x) * (2.0 * x - 1.0)
    x = x + np.float32(exposure.edge_gain) * (x - gaussian_blur(x, exposure.edge_mm / spacing))
    pixels: FloatArray = np.clip(x, 0.0, 1.0).astype(np.float32)
    return pixels


def develop(
    attenuation: FloatArray,
    reference: FloatArray,
    exposure: Exposure,
    spacing: float,
    noise: FloatArray,
) -> tuple[FloatArray, tuple[float, float]]:
    """Radiograph of ``attenuation``, processed as its lesion-free ``reference`` would be.

    ``reference`` is the lesion-free drawing (the same array for a normal
    image). Scatter, dynamic-range compression and window come from it and
    the noise field is shared, so a phantom and its lesion-free twin differ
    only where their attenuation differs (and an edge-enhancement kernel
    around it); a small lesion barely changes the scatter it would add.
    Returns the pixels and the window (log-signal units).
    """
    scatter = scatter_field(reference, exposure, spacing)
    reference_signal = log_signal(reference, exposure, noise, scatter)
    region = _window_region(reference, exposure)
    large = gaussian_blur(reference_signal, exposure.latitude_mm / spacing)
    floor = np.float32(np.percentile(large[region], 5.0))
    large = np.float32(exposure.latitude) * np.maximum(large - floor, 0.0)
    window = display_window(reference_signal - large, region, exposure.window)
    if attenuation is reference:
        signal = reference_signal
    else:
        signal = log_signal(attenuation, exposure, noise, scatter)
    return display(signal - large, window, exposure, spacing), window


def change_mask(
    before: FloatArray, after: FloatArray, window: tuple[float, float], spacing: float
) -> BoolArray:
    """Where the attenuation changed visibly, closed into solid regions.

    A change counts when it exceeds :data:`MASK_THRESHOLD` of the display
    window; a lesion too small for that at a coarse pixel spacing falls back to
    the pixels with at least half its largest change, so an abnormal image
    always has a mask where anything changed at all.
    """
    delta = np.abs(after - before)
    changed = delta > np.float32(MASK_THRESHOLD * (window[1] - window[0]))
    if not changed.any():
        largest = float(delta.max())
        changed = delta >= np.float32(largest / 2.0) if largest > 0 else changed
    radius = max(1, round(MASK_CLOSING_MM / spacing))
    return erode(dilate(changed, radius), radius)
