"""Lumbar spine radiograph phantoms in AP and lateral views, normal or abnormal.

One patient (``seed``) has one spine, T11 to the sacrum: vertebral bodies
with cortex, endplates and textured cancellous bone, intervertebral discs
(the gaps), pedicles, laminae, articular processes, spinous and transverse
processes, the 11th and 12th ribs, sacrum and iliac wings, an abdomen with
bowel gas. The AP view shows the pedicles end-on (the "eyes"); the lateral
view the lordosis, pedicles, facet pillars, neural foramina and spinous
processes.

Abnormal patients have either a **fracture** of T12-L4 (AP: compression
fracture, height loss 31-54 % with an impaction band; lateral: wedge
fracture, anterior height loss 38-66 %; Genant grades 2-3) or a
**deformity** (AP: a scoliotic curve whose apex vertebrae move 12-26 mm
sideways, tilt and rotate; lateral: a listhesis, one vertebra slipped
forwards by 22-45 % of its depth on the one below, carrying the column
above it, so the step is at one level only; Meyerding grades 1-2).
The ranges are moderate to severe on purpose: the demonstration models
train on a few hundred phantoms at 160-224 px on two CPU cores.

Lesion masks: a fracture's or a curve's mask is where the anatomy changed
(:func:`~dicomnode.training.phantoms.common.change_mask`). A slip moves
the whole column above it, so for a listhesis the mask is the slipped motion
segment instead: the lower half of the slipped body, the disc space and the
upper half of the body below (their convex hull, as an annotator would
outline the level).

Normal spines vary in size, disc heights (including some degenerative
narrowing), mild lean and curvature, lordosis, alignment jitter,
rotation, bone density, body habitus, bowel gas, pelvis and where the iliac
wings overlie the lumbosacral junction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial import ConvexHull

from dicomnode.training.phantoms.common import (
    BoolArray,
    Canvas,
    Frame,
    Limb,
    LongBone,
    Materials,
    Phantom,
    Point,
    Solid,
    change_mask,
    chord,
    develop,
    draw_limb,
    draw_long_bone,
    draw_solid,
    ellipse_sdf,
    noise_field,
    rng_for,
    sample_exposure,
    sample_tile,
    texture_tile,
)
from dicomnode.values import FloatArray

__all__ = ["LEVELS", "generate_spine"]

LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
"""Vertebrae drawn above the sacrum, top down."""

MATERIALS = Materials(soft=0.02, cortex=0.05, trabecular=0.014, texture=0.2)

_ANATOMY, _PLAN, _POSE, _EXPOSURE, _NOISE, _TEXTURE, _GAS = range(7)
_VIEW_STREAM = {"AP": 0, "LAT": 1}

# height, width (lateral), depth (AP), disc below, transverse process length
_SIZES: dict[str, tuple[float, float, float, float, float]] = {
    "T11": (21.0, 36.0, 29.0, 6.0, 12.0),
    "T12": (23.0, 39.0, 31.0, 7.5, 10.0),
    "L1": (24.5, 42.0, 33.0, 9.0, 16.0),
    "L2": (25.5, 44.0, 35.0, 10.0, 22.0),
    "L3": (26.0, 46.0, 36.0, 11.0, 27.0),
    "L4": (26.0, 49.0, 37.0, 11.0, 22.0),
    "L5": (25.0, 52.0, 37.0, 10.0, 20.0),
}
_FRACTURE_LEVELS = ("T12", "L1", "L2", "L3", "L4")
_FRACTURE_WEIGHTS = np.array([3.0, 4.0, 2.0, 1.0, 0.7])
_SLIP_LEVELS = ("L3", "L4", "L5")
_SLIP_WEIGHTS = np.array([0.15, 0.6, 0.25])


@dataclass(frozen=True)
class SpinePatient:
    """Patient-level anatomy shared by the AP and lateral views."""

    scale: float
    heights: tuple[float, ...]
    widths: tuple[float, ...]
    depths: tuple[float, ...]
    discs: tuple[float, ...]
    shapes: tuple[float, ...]
    density: float
    cortex: float
    lordosis: float
    abdomen: tuple[float, float, float]
    crest: float
    pelvis: float
    slope: float
    ilium: float


@dataclass(frozen=True)
class Plan:
    """The patient's abnormality, drawn as a view allows: kind, level, severity, side."""

    kind: str
    level: int
    severity: float
    side: float
    apex: int


@dataclass(frozen=True)
class Vertebra:
    """One vertebra placed for a view (body frame, mm; ``u`` across, ``v`` down the body)."""

    name: str
    centre: Point
    tilt: float
    rotation: float
    height: float
    width: float
    depth: float
    collapse: tuple[float, float]
    density: float
    texture: Point
    transverse: float


# --------------------------------------------------------------------------- anatomy


def _patient(rng: np.random.Generator) -> SpinePatient:
    scale = float(rng.uniform(0.9, 1.1))
    n = len(LEVELS)
    degenerate = rng.uniform(0.0, 0.5, n) * (rng.random(n) < np.linspace(0.0, 0.45, n))
    sizes = np.array([_SIZES[level] for level in LEVELS])
    return SpinePatient(
        scale=scale,
        heights=tuple(float(h) for h in sizes[:, 0] * scale * rng.normal(1.0, 0.04, n)),
        widths=tuple(float(w) for w in sizes[:, 1] * scale * rng.normal(1.0, 0.04, n)),
        depths=tuple(float(d) for d in sizes[:, 2] * scale * rng.normal(1.0, 0.04, n)),
        discs=tuple(
            float(d) for d in sizes[:, 3] * scale * rng.normal(1.0, 0.1, n) * (1 - degenerate)
        ),
        shapes=tuple(float(s) for s in rng.uniform(0.0, 0.1, n)),
        density=float(rng.uniform(0.75, 1.15)),
        cortex=float(rng.uniform(0.8, 1.2)),
        lordosis=float(rng.uniform(8.0, 26.0)),
        abdomen=(
            float(rng.uniform(130.0, 185.0)),
            float(rng.uniform(180.0, 300.0)),
            float(rng.uniform(105.0, 150.0)),
        ),
        crest=float(rng.uniform(-0.4, 0.6)),
        pelvis=float(rng.uniform(0.9, 1.1)),
        slope=float(rng.uniform(math.radians(30.0), math.radians(45.0))),
        # where the iliac wings overlie the lumbosacral junction varies with the pelvis
        ilium=float(rng.uniform(-14.0, 14.0)),
    )


def _plan(rng: np.random.Generator) -> Plan:
    if rng.random() < 0.5:
        index = rng.choice(len(_FRACTURE_LEVELS), p=_FRACTURE_WEIGHTS / _FRACTURE_WEIGHTS.sum())
        level = LEVELS.index(_FRACTURE_LEVELS[int(index)])
        severity = float(rng.uniform(0.35, 0.6))
        return Plan("fracture", level, severity, float(rng.choice([-1, 1])), level)
    index = rng.choice(len(_SLIP_LEVELS), p=_SLIP_WEIGHTS)
    level = LEVELS.index(_SLIP_LEVELS[int(index)])
    apex = int(rng.choice([3, 4]))
    return Plan("deformity", level, float(rng.uniform(0.0, 1.0)), float(rng.choice([-1, 1])), apex)


def _stack(p: SpinePatient) -> list[float]:
    """Vertical centres of the bodies, L3 at 0."""
    centres = [0.0]
    for i in range(1, len(LEVELS)):
        centres.append(centres[-1] + p.heights[i - 1] / 2 + p.discs[i - 1] + p.heights[i] / 2)
    offset = centres[LEVELS.index("L3")]
    return [c - offset for c in centres]


@dataclass(frozen=True)
class ViewPose:
    """Per-view posture: sideways lean and curvature, rotation, alignment jitter."""

    lean: float
    bow: float
    rotation: float
    jitter: tuple[float, ...]
    tilts: tuple[float, ...]


def _view_pose(rng: np.random.Generator) -> ViewPose:
    n = len(LEVELS)
    return ViewPose(
        lean=float(rng.normal(0.0, math.radians(2.5))),
        bow=float(rng.normal(0.0, 2.0)),
        rotation=float(rng.normal(0.0, math.radians(2.0))),
        jitter=tuple(float(j) for j in rng.normal(0.0, 0.8, n)),
        tilts=tuple(float(t) for t in rng.normal(0.0, math.radians(1.5), n)),
    )


def _scoliosis(plan: Plan, n: int) -> tuple[list[float], list[float]]:
    """Sideways offsets (mm) and tilts (rad) of a curve with its apex near ``plan.level``."""
    apex = plan.apex
    amplitude = plan.side * (12.0 + 14.0 * plan.severity)
    offsets, tilts = [], []
    for i in range(n):
        x = (i - apex) / 2.0
        inside = abs(x) < 1.0
        offsets.append(amplitude * math.cos(x * math.pi / 2) ** 2 if inside else 0.0)
        slope = -amplitude * math.pi / 2 * math.sin(x * math.pi) / 2.0 if inside else 0.0
        tilts.append(-math.atan(slope / 38.0))
    return offsets, tilts


def _column(p: SpinePatient, view: str, pose: ViewPose, plan: Plan | None) -> tuple[Vertebra, ...]:
    """The vertebrae as seen in ``view``, with ``plan`` drawn when given."""
    n = len(LEVELS)
    ys = _stack(p)
    span = ys[-1] - ys[0] + 40.0
    offsets, tilts = [0.0] * n, [0.0] * n
    if plan is not None and plan.kind == "deformity" and view == "AP":
        offsets, tilts = _scoliosis(plan, n)
    vertebrae = []
    for i, name in enumerate(LEVELS):
        t = (ys[i] - ys[0] + 20.0) / span
        if view == "AP":
            x = math.tan(pose.lean) * ys[i] + pose.bow * math.sin(math.pi * t) + offsets[i]
            tilt = -pose.lean + pose.tilts[i] + tilts[i]
            rotation = pose.rotation - math.radians(0.9) * offsets[i]
        else:
            bend = -p.lordosis * math.sin(math.pi * t)
            x = bend + pose.jitter[i]
            tilt = math.atan(p.lordosis * math.pi / span * math.cos(math.pi * t)) + pose.tilts[i]
            rotation = 0.0
        vertebrae.append(
            Vertebra(
                name=name,
                centre=(x, ys[i]),
                tilt=tilt,
                rotation=rotation,
                height=p.heights[i],
                width=p.widths[i] if view == "AP" else p.depths[i],
                depth=p.depths[i] if view == "AP" else p.widths[i],
                collapse=(p.shapes[i] * (view == "LAT"), 0.0),
                density=p.density,
                texture=(13.0 * i, 7.0 * i),
                transverse=_SIZES[name][4] * p.scale,
            )
        )
    if plan is not None:
        vertebrae = _apply_local(vertebrae, view, plan)
    return tuple(vertebrae)


def _apply_local(vertebrae: list[Vertebra], view: str, plan: Plan) -> list[Vertebra]:
    """A fracture changes one vertebra; a listhesis moves one and the column above it."""
    i = plan.level
    v = vertebrae[i]
    if plan.kind == "fracture":
        if view == "AP":
            loss = plan.severity * 0.9
            wedge = 0.15 * plan.side * plan.severity
            vertebrae[i] = replace(v, collapse=(loss + wedge, loss - wedge))
        else:
            front = plan.severity * 1.1
            vertebrae[i] = replace(v, collapse=(front, front * 0.15))
    elif view == "LAT":
        # The slipped vertebra carries the column above it: one step, at its level.
        shift = -(0.22 + 0.23 * plan.severity) * v.width
        dx, dy = shift * math.cos(v.tilt), shift * math.sin(v.tilt)
        for j in range(i + 1):
            above = vertebrae[j]
            vertebrae[j] = replace(above, centre=(above.centre[0] + dx, above.centre[1] + dy))
    return vertebrae


def lesion_name(plan: Plan, view: str) -> str:
    """How the plan reads in ``view``."""
    level = LEVELS[plan.level]
    if plan.kind == "fracture":
        return f"{'compression' if view == 'AP' else 'wedge'} fracture {level}"
    if view == "AP":
        return "scoliosis"
    below = LEVELS[plan.level + 1] if plan.level + 1 < len(LEVELS) else "S1"
    return f"listhesis {level}-{below}"


# --------------------------------------------------------------------------- drawing


def _local(v: Vertebra, du: float, dv: float) -> Point:
    """Body-frame point at (du across, dv down) in the vertebra's own frame."""
    cos, sin = math.cos(v.tilt), math.sin(v.tilt)
    return v.centre[0] + du * cos - dv * sin, v.centre[1] + du * sin + dv * cos


def _profile(
    u: FloatArray,
    v: FloatArray,
    half_width: float,
    top: FloatArray,
    bottom: float,
    depth: float,
    power: float,
    waist: float,
) -> FloatArray:
    """Path length through a body of straight-sided columns between ``top`` and ``bottom``."""
    centre = (top + bottom) / 2.0
    half = np.maximum((bottom - top) / 2.0, 0.1)
    relative = np.clip((v - centre) / half, -1.0, 1.0)
    across = half_width * (1.0 - waist * (1.0 - relative**2))
    fu = np.maximum(1.0 - np.clip(np.abs(u) / across, 0.0, 1.0) ** power, 0.0) ** (1.0 / power)
    rim = np.maximum(np.abs(v - centre) - (half - 1.5), 0.0) / 1.5
    fv = np.sqrt(np.clip(1.0 - rim**2, 0.0, 1.0))
    path: FloatArray = (depth * fu * fv).astype(np.float32)
    return path


def _draw_body(canvas: Canvas, v: Vertebra, lateral: bool, tile: FloatArray, cortex: float) -> None:
    """A vertebral body: cortical shell, endplates, textured cancellous core, collapse."""
    a, b = v.width / 2.0, v.height / 2.0
    patch = canvas.patch(v.centre, math.hypot(a, b) + 2.0, v.tilt)
    if patch is None:
        return
    u, w = patch.u, patch.v
    front, back = v.collapse
    share = np.clip((u + a) / (2 * a), 0.0, 1.0)
    loss = front + (back - front) * share
    buckle = 0.12 * max(front, back) * np.cos(np.clip(u / a, -1.0, 1.0) * math.pi / 2) ** 2
    top = (-b + 2 * b * (loss + buckle)).astype(np.float32)
    power, waist = (3.0, 0.03) if lateral else (2.0, 0.07)
    ct, ce = 1.0 * cortex, 1.1 * cortex
    outer = _profile(u, w, a, top, b, v.depth, power, waist)
    inner = _profile(u, w, a - ct, top + ce, b - ce, v.depth - 2 * ct, power, waist)
    relative = (w - top) / np.maximum(b - top, 0.1) * (2 * b) - b
    texture = sample_tile(tile, u, relative, v.texture)
    mu = MATERIALS
    trabecular = inner * (1.0 + mu.texture * texture)
    value = mu.cortex * (outer - inner) + mu.trabecular * trabecular
    sclerosis = max(0.0, max(front, back) - 0.12)
    if sclerosis > 0:
        band = np.exp(-(((w - top - 3.0) / 2.0) ** 2))
        value = value + mu.cortex * 0.6 * sclerosis * inner * band
    canvas.add_bone(patch, (v.density * value).astype(np.float32))


def _ap_elements(v: Vertebra, scale: float) -> list[Solid]:
    """Pedicles (end-on rings), laminae, articular and spinous processes in the AP view."""
    half_d, w, h = v.depth / 2.0, v.width, v.height
    cos, sin = math.cos(v.rotation), math.sin(v.rotation)

    def across(x: float, z: float) -> float:
        return x * cos + z * sin

    t, d, s = v.tilt, v.density, scale
    parts = [
        Solid(
            _local(v, across(0.0, half_d + 18), 0.22 * h),
            0.3 * w,
            0.32 * h,
            6.0 * s,
            2.0,
            t,
            corner=5.0,
            density=0.8 * d,
        ),
        Solid(
            _local(v, across(0.0, half_d + 35), 0.4 * h),
            4.5 * s,
            9.5 * s,
            9.0 * s,
            3.0,
            t,
            cortex=1.2,
            density=d,
            texture=(3.0, 9.0),
        ),
    ]
    for side in (-1.0, 1.0):
        parts += [
            Solid(
                _local(v, across(side * 0.3 * w, half_d + 6), -0.2 * h),
                4.2 * s,
                7.0 * s,
                14.0 * s,
                0.8,
                t,
                cortex=1.5,
                density=d,
            ),
            Solid(
                _local(v, across(side * 0.2 * w, half_d + 20), 0.62 * h),
                3.8 * s,
                7.0 * s,
                12.0 * s,
                3.0,
                t,
                cortex=1.0,
                density=d,
            ),
            Solid(
                _local(v, across(side * 0.27 * w, half_d + 20), -0.52 * h),
                3.8 * s,
                6.0 * s,
                12.0 * s,
                3.0,
                t,
                cortex=1.0,
                density=d,
            ),
        ]
    return parts


def _ap_processes(v: Vertebra, fixed: Vertebra, scale: float) -> list[LongBone]:
    """Transverse processes, and ribs on T11 and T12, in the AP view."""
    half_d, w = v.depth / 2.0, v.width
    cos, sin = math.cos(v.rotation), math.sin(v.rotation)
    thick = 1.4 if v.name == "L5" else 1.0
    bones = []
    for side in (-1.0, 1.0):
        start = _local(v, side * 0.36 * w * cos + (half_d + 8) * sin, -0.08 * v.height)
        angle = v.tilt + (0.0 if side > 0 else math.pi) - side * math.radians(8.0)
        bones.append(
            LongBone(
                f"TP {v.name}",
                start,
                angle,
                0.0,
                v.transverse,
                v.transverse,
                4.0 * scale * thick,
                3.0 * scale * thick,
                3.6 * scale * thick,
                0.4,
                0.6,
                1.0,
                v.density,
            )
        )
        if v.name in ("T11", "T12"):
            length = (110.0 if v.name == "T11" else 75.0) * scale
            rib = fixed.tilt + (0.0 if side > 0 else math.pi) + side * math.radians(28.0)
            root = _local(fixed, side * 0.36 * w, -0.08 * fixed.height)
            tip = (root[0] + side * v.transverse * math.cos(fixed.tilt), root[1])
            bones.append(
                LongBone(
                    f"rib {v.name}",
                    tip,
                    rib,
                    0.0,
                    length,
                    length,
                    5.0 * scale,
                    4.2 * scale,
                    3.8 * scale,
                    0.4,
                    0.6,
                    1.1,
                    v.density,
                )
            )
    return bones


def _lat_elements(v: Vertebra, scale: float) -> list[Solid]:
    """Pedicles, articular pillar and spinous process in the lateral view (+u posterior)."""
    half_d, h, t, d, s = v.width / 2.0, v.height, v.tilt, v.density, scale
    return [
        Solid(
            _local(v, half_d + 7.0 * s, -0.22 * h),
            8.0 * s,
            0.19 * h,
            14.0 * s,
            3.0,
            t,
            cortex=1.2,
            corner=3.0,
            density=d,
            texture=(5.0, 1.0),
        ),
        Solid(
            _local(v, half_d + 20.0 * s, 0.08 * h),
            5.5 * s,
            0.56 * h,
            15.0 * s,
            4.0,
            t + 0.12,
            cortex=1.2,
            corner=4.0,
            density=d,
            texture=(9.0, 2.0),
        ),
        Solid(
            _local(v, half_d + 42.0 * s, 0.28 * h),
            16.0 * s,
            0.3 * h,
            14.0 * s,
            3.0,
            t + 0.15,
            cortex=1.4,
            corner=5.0,
            density=d,
            texture=(1.0, 7.0),
        ),
        Solid(
            _local(v, half_d + 10.0 * s, -0.05 * h),
            5.0 * s,
            4.0 * s,
            v.transverse,
            1.5,
            t,
            density=0.6 * d,
        ),
    ]


def _lat_ribs(v: Vertebra, scale: float) -> list[LongBone]:
    if v.name not in ("T11", "T12"):
        return []
    length = (130.0 if v.name == "T11" else 90.0) * scale
    start = _local(v, v.width / 2.0 + 20.0 * scale, 0.0)
    return [
        LongBone(
            f"rib {v.name}",
            (start[0], start[1] + dy),
            math.pi - 0.55 + v.tilt,
            0.0,
            length,
            length,
            4.6 * scale,
            4.0 * scale,
            3.6 * scale,
            0.4,
            0.6,
            1.0,
            v.density,
        )
        for dy in (0.0, 6.0 * scale)
    ]


def _s1(p: SpinePatient, l5: Vertebra, lateral: bool) -> Vertebra:
    """The first sacral body, below the L5-S1 disc."""
    s = p.scale
    centre = _local(l5, 0.0, l5.height / 2.0 + p.discs[-1] + 14.0 * s)
    if lateral:
        return replace(
            l5,
            name="S1",
            centre=centre,
            tilt=-p.slope,
            height=28.0 * s,
            width=36.0 * s,
            depth=50.0 * s,
            collapse=(0.0, 0.0),
            texture=(3.0, 3.0),
        )
    return replace(
        l5,
        name="S1",
        centre=centre,
        height=28.0 * s,
        width=48.0 * s,
        depth=32.0 * s,
        collapse=(0.0, 0.0),
        rotation=0.0,
        texture=(3.0, 3.0),
    )


def _ap_pelvis(p: SpinePatient, s1: Vertebra) -> list[Solid]:
    """Sacral alae, lower sacral segments with their foramina, iliac wings."""
    s, d, t = p.scale, s1.density, s1.tilt
    parts: list[Solid] = []
    for k, (width, height) in enumerate(((64.0, 20.0), (50.0, 18.0), (36.0, 16.0))):
        parts.append(
            Solid(
                _local(s1, 0.0, (26.0 + 19.0 * k) * s),
                width / 2 * s,
                height / 2 * s,
                18.0 * s,
                6.0,
                t,
                cortex=1.0,
                corner=6.0,
                density=0.8 * d,
            )
        )
    for side in (-1.0, 1.0):
        parts.append(
            Solid(
                _local(s1, side * 33.0 * s, 4.0 * s),
                19.0 * s,
                15.0 * s,
                22.0 * s,
                8.0,
                t - side * 0.3,
                cortex=1.2,
                density=d,
            )
        )
        parts.append(
            Solid(
                _local(s1, side * 80.0 * s * p.pelvis, (p.crest * 20.0 - 8.0) * s),
                42.0 * s,
                62.0 * s,
                9.0 * s,
                2.5,
                t + side * 0.35,
                cortex=2.0,
                density=0.9 * d,
            )
        )
        for k in range(3):
            parts.append(
                Solid(
                    _local(s1, side * (18.0 - 2.0 * k) * s, (22.0 + 19.0 * k) * s),
                    4.0 * s,
                    4.0 * s,
                    14.0 * s,
                    4.0,
                    density=-0.8 * d,
                )
            )
    return parts


def _lat_pelvis(p: SpinePatient, s1: Vertebra) -> list[Solid]:
    """Lower sacral segments curving forwards, and the superimposed iliac wings."""
    s, d = p.scale, s1.density
    parts: list[Solid] = []
    centre, angle = s1.centre, s1.tilt
    for k, (half, height) in enumerate(((15.0, 10.0), (12.0, 9.0), (10.0, 8.0), (8.0, 7.0))):
        step = (s1.height / 2.0 if k == 0 else 9.0 * s) + height * s + 1.5 * s
        centre = (centre[0] - step * math.sin(angle), centre[1] + step * math.cos(angle))
        angle += 0.16
        parts.append(
            Solid(
                centre,
                half * s,
                height * s,
                40.0 * s,
                6.0,
                angle,
                cortex=1.0,
                corner=3.0,
                density=0.8 * d,
            )
        )
    parts.append(
        Solid(
            _local(s1, 35.0 * s + p.ilium, -25.0 * s + p.crest * 15.0),
            60.0 * s,
            45.0 * s,
            16.0 * s,
            2.0,
            -0.3,
            cortex=1.5,
            density=0.8 * d,
        )
    )
    return parts


def _gas(rng: np.random.Generator, lateral: bool) -> tuple[Solid, ...]:
    """Bowel gas: ellipses of gas within the abdomen (geometry only)."""
    count = int(rng.integers(0, 10))
    xs = rng.uniform(-200.0, -30.0, count) if lateral else rng.uniform(-130.0, 130.0, count)
    ys = rng.uniform(-140.0, 130.0, count)
    return tuple(
        Solid(
            (float(x), float(y)),
            float(rng.uniform(6.0, 30.0)),
            float(rng.uniform(6.0, 22.0)),
            float(rng.uniform(10.0, 50.0)),
            6.0,
            float(rng.uniform(0.0, math.pi)),
        )
        for x, y in zip(xs, ys, strict=True)
    )


def _draw_gas(canvas: Canvas, bubble: Solid) -> None:
    patch = canvas.patch(bubble.centre, max(bubble.a, bubble.b) + 1.0, bubble.angle)
    if patch is not None:
        sdf = ellipse_sdf(patch.u, patch.v, bubble.a, bubble.b)
        canvas.add_gas(patch, chord(bubble.depth, -sdf, min(bubble.a, bubble.b)))


def _abdomen(p: SpinePatient, lateral: bool) -> Limb:
    half_width, depth, back = p.abdomen
    if lateral:
        centre = back * p.scale - depth / 2.0
        return Limb((centre, -600.0), (centre, 600.0), depth / 2.0, 1.8 * half_width)
    return Limb((0.0, -600.0), (0.0, 600.0), half_width, depth)


def draw_spine(
    frame: Frame,
    p: SpinePatient,
    column: tuple[Vertebra, ...],
    gas: tuple[Solid, ...],
    tile: FloatArray,
    lateral: bool,
    anchor: tuple[Vertebra, ...],
) -> FloatArray:
    """The attenuation line integral of the spine ``column`` of patient ``p``.

    On the AP view the ribs hang from the ``anchor`` column (the lesion-free
    one): the rib cage does not follow a lumbar curve. On the lateral view
    they hang from ``column``: a slip carries the trunk above it.
    """
    canvas = Canvas(frame)
    draw_limb(canvas, _abdomen(p, lateral))
    for bubble in gas:
        _draw_gas(canvas, bubble)
    s1 = _s1(p, anchor[-1], lateral)
    for vertebra in (*column, s1):
        _draw_body(canvas, vertebra, lateral, tile, p.cortex)
    solids: list[Solid] = []
    bones: list[LongBone] = []
    for vertebra, fixed in zip(column, anchor, strict=True):
        if lateral:
            solids += _lat_elements(vertebra, p.scale)
            bones += _lat_ribs(vertebra, p.scale)
        else:
            solids += _ap_elements(vertebra, p.scale)
            bones += _ap_processes(vertebra, fixed, p.scale)
    solids += _lat_pelvis(p, s1) if lateral else _ap_pelvis(p, s1)
    for solid in solids:
        draw_solid(canvas, solid, tile, MATERIALS)
    for bone in bones:
        draw_long_bone(canvas, bone, tile, MATERIALS)
    return canvas.attenuation(MATERIALS.soft)


def _segment_mask(frame: Frame, upper: Vertebra, lower: Vertebra) -> BoolArray:
    """The motion segment between two bodies on ``frame``: where a listhesis is.

    The convex hull of the lower half of ``upper``, the disc space and the
    upper half of ``lower`` (a slip's step included).
    """
    corners = [
        _local(upper, side * upper.width / 2.0, down * upper.height / 2.0)
        for side in (-1.0, 1.0)
        for down in (0.0, 1.0)
    ] + [
        _local(lower, side * lower.width / 2.0, -down * lower.height / 2.0)
        for side in (-1.0, 1.0)
        for down in (0.0, 1.0)
    ]
    x, y = frame.grid()
    inside = np.ones(x.shape, np.bool_)
    for a, b, offset in ConvexHull(np.array(corners)).equations:
        inside &= a * x + b * y + offset <= 0.0
    return inside


def _frame(rng: np.random.Generator, size: int, lateral: bool, scale: float) -> Frame:
    centre = (float(rng.normal(12.0 if lateral else 0.0, 10.0)), float(rng.normal(-5.0, 15.0)))
    return Frame(
        size=size,
        spacing=float(rng.uniform(270.0, 340.0)) * scale / size,
        centre=centre,
        angle=float(rng.normal(0.0, math.radians(2.5))),
        mirror=lateral and bool(rng.random() < 0.3),
    )


def generate_spine(
    seed: int,
    *,
    view: str = "AP",
    size: int = 512,
    abnormal: bool = False,
    with_lesion: bool = True,
) -> Phantom:
    """A lumbar spine radiograph of patient ``seed``, normal or abnormal.

    Parameters
    ----------
    seed:
        The patient: anatomy and the abnormality (fracture level, or
        scoliosis and listhesis) are shared by both views of a seed; pose,
        exposure, noise and bowel gas differ between views.
    view:
        ``"AP"`` or ``"LAT"`` (anterior on the image left, mirrored a third
        of the time).
    size:
        Rows = columns, at least 32.
    abnormal:
        Draw the patient's abnormality as the view shows it: AP a
        compression fracture or scoliosis, lateral a wedge fracture or a
        listhesis (see the module notes).
    with_lesion:
        ``False`` draws an abnormal case's lesion-free twin: identical
        anatomy, pose, exposure and noise, labelled normal.

    Returns
    -------
    Phantom
        ``body_part`` ``"SPINE"``, ``laterality`` ``None``.

    Raises
    ------
    ValueError
        If ``view`` or ``size`` is invalid.
    """
    if view not in _VIEW_STREAM:
        raise ValueError(f"view must be 'AP' or 'LAT', not {view!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32, not {size}")
    lateral = view == "LAT"
    stream = _VIEW_STREAM[view]
    patient = _patient(rng_for(seed, _ANATOMY))
    plan = _plan(rng_for(seed, _PLAN))
    pose = _view_pose(rng_for(seed, _POSE, stream))
    frame = _frame(rng_for(seed, _POSE, stream, 1), size, lateral, patient.scale)
    tile = texture_tile(rng_for(seed, _TEXTURE))
    gas = _gas(rng_for(seed, _GAS, stream), lateral)
    column = _column(patient, view, pose, None)
    normal = draw_spine(frame, patient, column, gas, tile, lateral, column)
    exposure = sample_exposure(
        rng_for(seed, _EXPOSURE, stream),
        photons=(1.5e5, 1.5e6),
        scatter=(0.3, 0.9),
        window=((0.3, 4.0), (99.0, 99.9)),
        latitude=(0.3, 0.7),
        body=0.6,
    )
    noise = noise_field(rng_for(seed, _NOISE, stream), size)
    drawn, lesion_column = normal, column
    if abnormal and with_lesion:
        lesion_column = _column(patient, view, pose, plan)
        drawn = draw_spine(frame, patient, lesion_column, gas, tile, lateral, column)
    pixels, window = develop(drawn, normal, exposure, frame.spacing, noise)
    lesioned = drawn is not normal
    if not lesioned:
        mask = np.zeros(pixels.shape, np.bool_)
    elif lateral and plan.kind == "deformity":
        below = plan.level + 1
        lower = lesion_column[below] if below < len(LEVELS) else _s1(patient, column[-1], True)
        mask = _segment_mask(frame, lesion_column[plan.level], lower)
    else:
        mask = change_mask(normal, drawn, window, frame.spacing)
    orientation = ("L", "F") if not lateral else ("A" if frame.mirror else "P", "F")
    return Phantom(
        pixels=pixels,
        label=int(lesioned),
        lesion_mask=mask,
        body_part="SPINE",
        view=view,
        laterality=None,
        lesion=lesion_name(plan, view) if lesioned else "",
        spacing_mm=frame.spacing,
        orientation=orientation,
    )
