"""A posteroanterior hand radiograph phantom, normal or with rheumatoid changes.

The model is a right hand in a body frame (mm; thumb towards -x, fingers
towards -y, origin near the capitate); a left hand is the same patient's hand
mirrored. It has the distal radius and ulna with their styloids, eight carpal
bones (and the hook of the hamate seen end-on), five metacarpals, fourteen
phalanges with flared bases, rounded heads and distal tufts, two thumb
sesamoids, and soft tissue (forearm, palm, thenar and hypothenar eminences,
fingers). Each tubular bone has a cortex around a textured trabecular core;
joint spaces are the gaps between the articular ends.

Rheumatoid changes, at two to five joints among MCP2-5, PIP2-5 and the
wrist (RA is polyarticular), each one or more of:

* marginal **erosion** (always, at an affected finger joint): a punched-out
  bite of bone at the bare area of the joint margin (radial or ulnar side of
  the head or base), 1.8-3.6 mm;
* joint-space **narrowing**: the articular ends grow into the joint space,
  closing 40-85 % of it (MCP and PIP joints);
* periarticular **osteopenia**: bone density lowered by 20-45 % around the
  joint, falling off over 8-13 mm.

The lesion mask is where the attenuation changed visibly, and for a narrowed
joint also the joint space it had (now partly bone, partly still open: the
narrowing is read across it).

Patient-level anatomy (size, bone density, joint spaces, soft tissue) comes
from ``seed``; pose, exposure, noise and the lesions from ``(seed, side)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from dicomnode.training.phantoms.common import (
    BoolArray,
    Canvas,
    Frame,
    Limb,
    LongBone,
    Materials,
    Pad,
    Phantom,
    Point,
    Solid,
    Spot,
    along,
    change_mask,
    convex_hull,
    develop,
    draw_limb,
    draw_long_bone,
    draw_pad,
    draw_solid,
    draw_spot,
    noise_field,
    rng_for,
    sample_exposure,
    texture_tile,
)
from dicomnode.values import FloatArray

__all__ = ["generate_hand"]

MATERIALS = Materials(soft=0.026, cortex=0.07, trabecular=0.016)
UP = -math.pi / 2.0

_ANATOMY, _POSE, _EXPOSURE, _NOISE, _LESION, _TEXTURE = range(6)

# Metacarpals 2-5: base (x, y), tilt (deg, + towards the ulna), length, radii, cortex.
_METACARPALS: dict[int, tuple[Point, float, float, float, float, float, float]] = {
    2: ((-12.0, -14.0), -5.0, 66.0, 6.3, 4.1, 6.6, 1.45),
    3: ((-1.0, -14.5), -0.5, 63.0, 6.5, 4.2, 6.9, 1.45),
    4: ((8.5, -14.0), 5.0, 56.0, 5.4, 3.5, 6.1, 1.25),
    5: ((16.5, -11.5), 12.0, 52.0, 5.4, 3.5, 5.8, 1.2),
}
# Phalanges of fingers 2-5 (proximal, middle, distal lengths), spread (deg), width factor.
_FINGERS: dict[int, tuple[tuple[float, float, float], float, float]] = {
    2: ((41.0, 24.0, 17.5), -5.0, 0.97),
    3: ((46.0, 28.5, 19.5), 0.0, 1.0),
    4: ((43.0, 27.0, 19.0), 4.5, 0.93),
    5: ((34.0, 19.5, 16.5), 10.0, 0.84),
}
# (name, centre, a, b, angle deg, depth)
_CARPALS: tuple[tuple[str, Point, float, float, float, float, float | None], ...] = (
    ("scaphoid", (-14.5, 8.5), 10.5, 5.8, 48.0, 12.0, None),
    ("lunate", (-2.5, 12.8), 7.0, 6.3, 0.0, 14.0, 3.5),
    ("triquetrum", (9.0, 10.0), 6.3, 5.0, -30.0, 11.0, 3.0),
    ("pisiform", (10.5, 7.0), 4.4, 4.1, 0.0, 9.0, None),
    ("trapezium", (-21.5, -4.0), 7.0, 6.0, -30.0, 12.0, 3.0),
    ("trapezoid", (-11.8, -5.2), 5.0, 5.8, 0.0, 11.0, 2.5),
    ("capitate", (-0.8, -2.3), 5.8, 9.4, 0.0, 14.0, 4.0),
    ("hamate", (10.5, -3.0), 6.0, 8.4, -12.0, 13.0, 3.5),
)
_GAPS = {"MCP": 2.0, "PIP": 1.5, "DIP": 1.2, "IP": 1.4}
_SITES = ("MCP2", "MCP3", "MCP4", "MCP5", "PIP2", "PIP3", "PIP4", "PIP5", "wrist")
_SITE_WEIGHTS = np.array([3.0, 3.0, 2.0, 1.5, 2.0, 2.0, 1.5, 1.0, 2.0])


@dataclass(frozen=True)
class Joint:
    """A joint between two long bones (``proximal`` head, ``distal`` base)."""

    name: str
    proximal: str
    distal: str


@dataclass(frozen=True)
class Ring:
    """A metal finger ring: a band ``width`` mm wide around a finger of ``radius``."""

    centre: Point
    angle: float
    radius: float
    width: float


@dataclass(frozen=True)
class Hand:
    """A drawable hand: bones, ossicles and soft tissue, with its joints."""

    bones: tuple[LongBone, ...]
    ossicles: tuple[Solid, ...]
    soft: tuple[Limb | Pad, ...]
    joints: tuple[Joint, ...]
    ring: Ring | None

    def bone(self, name: str) -> LongBone:
        return next(b for b in self.bones if b.name == name)


@dataclass(frozen=True)
class Patient:
    """Per-patient proportions shared by both hands."""

    scale: float
    density: float
    cortex: float
    gap: float
    soft: float
    jitter: tuple[float, ...]


@dataclass(frozen=True)
class Pose:
    """Per-image posture of the fingers and the hand on the detector."""

    spread: float
    flexion: tuple[float, ...]
    bend: tuple[float, ...]
    thumb: float
    ring: bool


@dataclass(frozen=True)
class JointSpace:
    """A narrowed joint's space before narrowing: tip to tip, ``half_width`` across (mm)."""

    proximal: Point
    distal: Point
    half_width: float

    def mask(self, frame: Frame) -> BoolArray:
        """Its pixels on ``frame``: between the two tips, within ``half_width`` of the axis."""
        x, y = frame.grid()
        ax, ay = self.proximal
        length = max(math.hypot(self.distal[0] - ax, self.distal[1] - ay), 1e-6)
        cos, sin = (self.distal[0] - ax) / length, (self.distal[1] - ay) / length
        along = (x - ax) * cos + (y - ay) * sin
        across = -(x - ax) * sin + (y - ay) * cos
        inside: BoolArray = (along >= 0) & (along <= length) & (np.abs(across) <= self.half_width)
        return inside


@dataclass(frozen=True)
class HandLesions:
    """What the rheumatoid changes do: replaced bones, density spots, and their names."""

    bones: tuple[LongBone, ...]
    spots: tuple[Spot, ...]
    names: tuple[str, ...]
    spaces: tuple[JointSpace, ...] = ()


# --------------------------------------------------------------------------- anatomy


def _patient(rng: np.random.Generator) -> Patient:
    return Patient(
        scale=float(rng.uniform(0.88, 1.12)),
        density=float(rng.uniform(0.8, 1.15)),
        cortex=float(rng.uniform(0.8, 1.15)),
        gap=float(rng.uniform(0.8, 1.25)),
        soft=float(rng.uniform(0.85, 1.2)),
        jitter=tuple(float(j) for j in rng.normal(1.0, 0.025, 80)),
    )


def _pose(rng: np.random.Generator) -> Pose:
    return Pose(
        spread=float(rng.uniform(0.3, 1.6)),
        flexion=tuple(float(f) for f in rng.uniform(0.86, 1.0, 5)),
        bend=tuple(float(b) for b in rng.normal(0.0, math.radians(2.5), 15)),
        thumb=float(rng.normal(0.0, math.radians(6.0))),
        ring=bool(rng.random() < 0.07),
    )


def _tube(
    name: str,
    origin: Point,
    angle: float,
    length: float,
    radii: tuple[float, ...],
    caps: tuple[float, float],
    cortex: float,
    p: Patient,
    index: int,
    vary: bool = True,
) -> LongBone:
    """A long bone scaled to the patient; ``radii`` are (base, shaft, head).

    ``index`` picks the bone's own length and density jitter; ``vary=False``
    keeps the length exact (forearm bones, whose distal ends are placed).
    """
    s = p.scale
    length = length * s * (p.jitter[index] if vary else 1.0)
    return LongBone(
        name=name,
        origin=origin,
        angle=angle,
        start=0.0,
        end=length,
        nominal=length,
        base=radii[0] * s,
        shaft=radii[1] * s,
        head=radii[2] * s,
        base_cap=caps[0],
        head_cap=caps[1],
        cortex=cortex * s * p.cortex,
        density=p.density * p.jitter[index + 20] ** 2,
        texture=(17.0 * index, 29.0 * index),
    )


def _after(bone: LongBone, gap: float, angle: float, base: float, base_cap: float) -> Point:
    """Origin of the next bone: ``gap`` mm beyond ``bone``'s head tip, along ``angle``."""
    return along(bone.tip(distal=True), angle, gap + base_cap * base)


def _finger(finger: int, p: Patient, pose: Pose) -> tuple[LongBone, ...]:
    (bx, by), tilt, length, base, shaft, head, cortex = _METACARPALS[finger]
    s = p.scale
    angle = UP + math.radians(tilt)
    mc = _tube(
        f"MC{finger}",
        (bx * s, by * s),
        angle,
        length,
        (base, shaft, head),
        (0.3, 0.85),
        cortex,
        p,
        finger,
    )
    lengths, spread, width = _FINGERS[finger]
    angle += math.radians(spread) * pose.spread + pose.bend[finger * 3 - 6]
    flex = pose.flexion[finger - 1]
    radii = ((6.2, 4.3, 5.0), (5.2, 3.5, 4.1), (4.5, 2.4, 3.6))
    caps = ((0.3, 0.6), (0.3, 0.55), (0.3, 0.75))
    gaps = (_GAPS["MCP"], _GAPS["PIP"], _GAPS["DIP"])
    bones = [mc]
    for k, label in enumerate(("P1", "P2", "P3")):
        r = tuple(x * width for x in radii[k])
        if k:
            angle += pose.bend[finger * 3 - 6 + k]
        origin = _after(bones[-1], gaps[k] * s * p.gap, angle, r[0] * s, caps[k][0])
        bones.append(
            _tube(
                f"{label}-{finger}",
                origin,
                angle,
                lengths[k] * flex ** (k + 1),
                r,
                caps[k],
                1.2 if k < 2 else 0.7,
                p,
                5 + finger * 3 + k,
            )
        )
    return tuple(bones)


def _thumb(p: Patient, pose: Pose) -> tuple[LongBone, ...]:
    s = p.scale
    angle = UP - math.radians(36.0) + pose.thumb
    mc = _tube("MC1", (-26.5 * s, -10.0 * s), angle, 44.0, (7.0, 4.4, 6.4), (0.3, 0.8), 1.3, p, 1)
    angle += math.radians(10.0)
    p1 = _tube(
        "P1-1",
        _after(mc, _GAPS["MCP"] * s * p.gap, angle, 6.2 * s, 0.3),
        angle,
        31.0,
        (6.2, 4.3, 5.1),
        (0.3, 0.6),
        1.0,
        p,
        30,
    )
    p2 = _tube(
        "P2-1",
        _after(p1, _GAPS["IP"] * s * p.gap, angle, 5.4 * s, 0.3),
        angle,
        24.0,
        (5.4, 3.0, 4.3),
        (0.3, 0.75),
        0.7,
        p,
        31,
    )
    return mc, p1, p2


def _forearm(p: Patient) -> tuple[LongBone, ...]:
    s = p.scale
    radius = _tube(
        "radius",
        (-9.0 * s, 180.0),
        UP - 0.05,
        180.0 / s - 22.0,
        (8.5, 8.5, 13.0),
        (0.3, 0.28),
        1.9,
        p,
        32,
        vary=False,
    )
    ulna = _tube(
        "ulna",
        (14.5 * s, 180.0),
        UP + 0.02,
        180.0 / s - 24.5,
        (6.0, 6.0, 7.6),
        (0.3, 0.5),
        1.6,
        p,
        33,
        vary=False,
    )
    styloid = _tube(
        "ulnar styloid",
        (18.5 * s, 23.0 * s),
        UP + 0.12,
        5.5,
        (3.0, 2.3, 1.9),
        (0.3, 0.6),
        0.6,
        p,
        34,
        vary=False,
    )
    return replace(radius, flare=0.1), replace(ulna, flare=0.1), styloid


def _ossicles(p: Patient, bones: dict[str, LongBone]) -> tuple[Solid, ...]:
    s = p.scale
    solids = [
        Solid(
            (x * s, y * s),
            a * s,
            b * s,
            depth * s,
            min(a, b) * s * (1.0 if c is None else 0.8),
            math.radians(angle),
            cortex=0.5 * s * p.cortex,
            density=p.density * p.jitter[35 + i],
            texture=(11.0 * i, 5.0 * i),
            corner=None if c is None else c * s,
        )
        for i, (_, (x, y), a, b, angle, depth, c) in enumerate(_CARPALS)
    ]
    solids.append(
        Solid((7.5 * s, -1.5 * s), 2.6 * s, 3.2 * s, 8.0 * s, 1.0, cortex=0.7, density=p.density)
    )
    solids.append(
        Solid(
            (-21.5 * s, 16.5 * s),
            3.4 * s,
            5.5 * s,
            10.0 * s,
            3.0 * s,
            math.radians(-20.0),
            cortex=0.8,
            density=p.density,
        )
    )
    mc1 = bones["MC1"]
    head = along(mc1.origin, mc1.angle, mc1.end - 1.0)
    for side in (-1.0, 1.0):
        centre = along(head, mc1.angle + side * math.pi / 2.0, 0.8 * mc1.head)
        solids.append(
            Solid(centre, 2.6 * s, 2.9 * s, 5.5 * s, 2.6 * s, cortex=0.5, density=p.density)
        )
    return tuple(solids)


def _soft(p: Patient, bones: dict[str, LongBone]) -> tuple[Limb | Pad, ...]:
    s, k = p.scale, p.soft
    shapes: list[Limb | Pad] = [Limb((0.0, 6.0 * s), (0.0, 260.0), 29.0 * s * k**0.5, 42.0 * s * k)]
    hull: list[Point] = [(-27.0 * s, 12.0 * s), (27.0 * s, 12.0 * s)]
    for finger, width in ((1, 10.0), (2, 8.3), (3, 8.6), (4, 8.0), (5, 7.3)):
        mc = bones[f"MC{finger}"]
        tip = bones[f"P{2 if finger == 1 else 3}-{finger}"].tip(distal=True)
        start = along(mc.origin, mc.angle, mc.end * (0.5 if finger == 1 else 0.85))
        end = along(tip, mc.angle if finger == 1 else bones[f"P3-{finger}"].angle, 3.5 * s)
        r = width * s * k**0.5
        shapes.append(Limb(start, end, r, 1.7 * r))
        if finger > 1:
            for side in (-1.0, 1.0):
                hull.append(
                    along(
                        along(mc.origin, mc.angle, mc.end + 2.0),
                        mc.angle + side * math.pi / 2.0,
                        mc.head + 2.5 * s,
                    )
                )
    thumb = bones["MC1"]
    shapes.append(
        Limb(thumb.origin, along(thumb.origin, thumb.angle, thumb.end), 13.0 * s, 24.0 * s * k)
    )
    hull.append(along(bones["MC5"].origin, 0.0, 11.0 * s))
    shapes.append(Pad(convex_hull(hull), 30.0 * s * k, 13.0 * s))
    return tuple(shapes)


def _ring(bones: dict[str, LongBone], pose: Pose, scale: float) -> Ring | None:
    if not pose.ring:
        return None
    p1 = bones["P1-4"]
    return Ring(along(p1.origin, p1.angle, 0.45 * p1.end), p1.angle, 7.6 * scale, 3.0)


def build_hand(p: Patient, pose: Pose) -> Hand:
    """The normal hand of patient ``p`` in posture ``pose`` (right-hand body frame)."""
    bones = (
        *_forearm(p),
        *_thumb(p, pose),
        *(b for f in (2, 3, 4, 5) for b in _finger(f, p, pose)),
    )
    by_name = {b.name: b for b in bones}
    joints = [Joint(f"MCP{f}", f"MC{f}", f"P1-{f}") for f in (2, 3, 4, 5)]
    joints += [Joint(f"PIP{f}", f"P1-{f}", f"P2-{f}") for f in (2, 3, 4, 5)]
    return Hand(
        bones,
        _ossicles(p, by_name),
        _soft(p, by_name),
        tuple(joints),
        _ring(by_name, pose, p.scale),
    )


# --------------------------------------------------------------------------- lesions


def _joint_centre(hand: Hand, joint: Joint) -> Point:
    a = hand.bone(joint.proximal).tip(distal=True)
    b = hand.bone(joint.distal).tip(distal=False)
    return (a[0] + b[0]) / 2.0, (a[1] + b[1]) / 2.0


def _erosion(hand: Hand, joint: Joint, rng: np.random.Generator, scale: float) -> Spot:
    """A marginal erosion at the bare area of the head (usually) or the base."""
    on_head = rng.random() < 0.7
    bone = hand.bone(joint.proximal if on_head else joint.distal)
    if on_head:
        u = bone.end - rng.uniform(0.0, 0.4) * bone.head
    else:
        u = bone.start + rng.uniform(0.1, 0.5) * bone.base
    side = rng.choice([-1.0, 1.0])
    margin = along(
        along(bone.origin, bone.angle, u),
        bone.angle + side * math.pi / 2.0,
        bone.radius_at(u) * rng.uniform(0.85, 1.0),
    )
    return Spot(
        margin, float(rng.uniform(1.8, 3.6)) * scale, float(rng.uniform(0.6, 0.95)), sharp=True
    )


def _narrowing(
    hand: Hand, joint: Joint, rng: np.random.Generator
) -> tuple[LongBone, LongBone, JointSpace]:
    """Both articular ends grow into the joint space, closing 40-85 % of it."""
    proximal, distal = hand.bone(joint.proximal), hand.bone(joint.distal)
    a, b = proximal.tip(distal=True), distal.tip(distal=False)
    closed = math.hypot(a[0] - b[0], a[1] - b[1]) * float(rng.uniform(0.4, 0.85))
    share = float(rng.uniform(0.3, 0.7))
    return (
        replace(proximal, end=proximal.end + share * closed),
        replace(distal, start=distal.start - (1.0 - share) * closed),
        JointSpace(a, b, 0.8 * min(proximal.head, distal.base)),
    )


def _osteopenia(centre: Point, rng: np.random.Generator, scale: float, wide: float) -> Spot:
    return Spot(
        centre,
        float(rng.uniform(8.0, 13.0)) * scale * wide,
        float(rng.uniform(0.2, 0.45)),
        sharp=False,
    )


def _wrist_lesion(hand: Hand, kind: str, rng: np.random.Generator, scale: float) -> Spot:
    if kind == "osteopenia":
        return _osteopenia((-3.0 * scale, 18.0 * scale), rng, scale, 1.8)
    styloid = hand.bone("ulnar styloid")
    tip = along(styloid.origin, styloid.angle, styloid.end * rng.uniform(0.3, 1.0))
    return Spot(
        tip, float(rng.uniform(1.8, 3.2)) * scale, float(rng.uniform(0.6, 0.95)), sharp=True
    )


def _kinds(site: str, rng: np.random.Generator) -> list[str]:
    options = (
        ["erosion", "osteopenia"] if site == "wrist" else ["erosion", "narrowing", "osteopenia"]
    )
    # Marginal erosions are the hallmark of established RA: always at a finger joint.
    chosen = [k for k in options if (k == "erosion" and site != "wrist") or rng.random() < 0.5]
    return chosen or [str(rng.choice(options))]


def sample_lesions(hand: Hand, rng: np.random.Generator, scale: float) -> HandLesions:
    """Rheumatoid changes at two to five joints of ``hand`` (RA is polyarticular)."""
    count = int(rng.choice([2, 3, 4, 5], p=[0.3, 0.3, 0.25, 0.15]))
    sites = rng.choice(
        len(_SITES), size=count, replace=False, p=_SITE_WEIGHTS / _SITE_WEIGHTS.sum()
    )
    bones: dict[str, LongBone] = {}
    spots: list[Spot] = []
    names: list[str] = []
    spaces: list[JointSpace] = []
    for index in sorted(int(i) for i in sites):
        site = _SITES[index]
        for kind in _kinds(site, rng):
            names.append(
                f"{kind} {'ulnar styloid' if site == 'wrist' and kind == 'erosion' else site}"
            )
            if site == "wrist":
                spots.append(_wrist_lesion(hand, kind, rng, scale))
                continue
            joint = next(j for j in hand.joints if j.name == site)
            if kind == "erosion":
                spots.append(_erosion(hand, joint, rng, scale))
            elif kind == "osteopenia":
                spots.append(_osteopenia(_joint_centre(hand, joint), rng, scale, 1.0))
            else:
                proximal, distal, space = _narrowing(hand, joint, rng)
                bones[proximal.name], bones[distal.name] = proximal, distal
                spaces.append(space)
    return HandLesions(tuple(bones.values()), tuple(spots), tuple(names), tuple(spaces))


def with_lesions(hand: Hand, lesions: HandLesions) -> Hand:
    """``hand`` with the lesions' replaced bones."""
    changed = {b.name: b for b in lesions.bones}
    return replace(hand, bones=tuple(changed.get(b.name, b) for b in hand.bones))


# --------------------------------------------------------------------------- drawing


def draw_hand(frame: Frame, hand: Hand, spots: tuple[Spot, ...], tile: FloatArray) -> FloatArray:
    """The attenuation line integral of ``hand`` (with density ``spots``) on ``frame``."""
    canvas = Canvas(frame)
    for shape in hand.soft:
        if isinstance(shape, Limb):
            draw_limb(canvas, shape)
        else:
            draw_pad(canvas, shape)
    for bone in hand.bones:
        draw_long_bone(canvas, bone, tile, MATERIALS)
    for solid in hand.ossicles:
        draw_solid(canvas, solid, tile, MATERIALS)
    for spot in spots:
        draw_spot(canvas, spot)
    if hand.ring is not None:
        _draw_ring(canvas, hand.ring)
    return canvas.attenuation(MATERIALS.soft)


def _draw_ring(canvas: Canvas, ring: Ring) -> None:
    """A band of metal: the annulus' chord across the finger, soft-edged along it."""
    patch = canvas.patch(ring.centre, ring.radius + ring.width + 2.0, ring.angle)
    if patch is None:
        return
    outer = np.sqrt(np.maximum((ring.radius + 1.5) ** 2 - patch.v**2, 0.0))
    inner = np.sqrt(np.maximum(ring.radius**2 - patch.v**2, 0.0))
    band = np.clip((ring.width / 2.0 - np.abs(patch.u)) / 0.3, 0.0, 1.0)
    canvas.add_metal(patch, (0.4 * 2.0 * (outer - inner) * band).astype(np.float32))


def _frame(rng: np.random.Generator, size: int, laterality: str, scale: float) -> Frame:
    centre = (float(rng.normal(0.0, 6.0)) * scale, float(-80.0 + rng.normal(0.0, 6.0)) * scale)
    return Frame(
        size=size,
        spacing=float(rng.uniform(250.0, 290.0)) * scale / size,
        centre=centre,
        angle=float(rng.normal(0.0, math.radians(7.0))),
        mirror=laterality == "L",
    )


def generate_hand(
    seed: int,
    *,
    laterality: str = "R",
    size: int = 512,
    abnormal: bool = False,
    with_lesion: bool = True,
) -> Phantom:
    """A PA hand radiograph of patient ``seed``, normal or with rheumatoid changes.

    Parameters
    ----------
    seed:
        The patient: anatomy is shared by both hands of a seed; pose,
        exposure, noise and lesions differ between ``"L"`` and ``"R"``.
    laterality:
        ``"R"`` (thumb on the image left) or ``"L"`` (mirrored).
    size:
        Rows = columns, at least 32.
    abnormal:
        Draw rheumatoid changes at two to five joints (see the module notes).
    with_lesion:
        ``False`` draws an abnormal case's lesion-free twin: identical
        anatomy, pose, exposure and noise, labelled normal.

    Returns
    -------
    Phantom
        ``body_part`` ``"HAND"``, ``view`` ``"PA"``.

    Raises
    ------
    ValueError
        If ``laterality`` or ``size`` is invalid.
    """
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', not {laterality!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32, not {size}")
    side = 0 if laterality == "R" else 1
    patient = _patient(rng_for(seed, _ANATOMY))
    pose = _pose(rng_for(seed, _POSE, side))
    hand = build_hand(patient, pose)
    frame = _frame(rng_for(seed, _POSE, side, 1), size, laterality, patient.scale)
    tile = texture_tile(rng_for(seed, _TEXTURE))
    normal = draw_hand(frame, hand, (), tile)
    exposure = sample_exposure(
        rng_for(seed, _EXPOSURE, side),
        photons=(2000.0, 20000.0),
        scatter=(0.05, 0.25),
        window=((1.0, 30.0), (99.3, 99.95)),
    )
    noise = noise_field(rng_for(seed, _NOISE, side), size)
    lesions = None
    drawn = normal
    if abnormal and with_lesion:
        lesions = sample_lesions(hand, rng_for(seed, _LESION, side), patient.scale)
        drawn = draw_hand(frame, with_lesions(hand, lesions), lesions.spots, tile)
    pixels, window = develop(drawn, normal, exposure, frame.spacing, noise)
    mask = np.zeros(pixels.shape, np.bool_)
    if lesions is not None:
        mask = change_mask(normal, drawn, window, frame.spacing)
        for space in lesions.spaces:
            mask |= space.mask(frame)
    return Phantom(
        pixels=pixels,
        label=int(lesions is not None),
        lesion_mask=mask,
        body_part="HAND",
        view="PA",
        laterality=laterality,
        lesion=", ".join(lesions.names) if lesions else "",
        spacing_mm=frame.spacing,
        orientation=("L", "H"),
    )
