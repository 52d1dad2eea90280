"""An analytic, vectorised ray caster for the ``rooms`` scenes (torch, CPU).

World frame: ``y`` up, the floor is ``y = 0``; the room is the box ``|x| <= width / 2``,
``0 <= y <= height``, ``0 <= z <= length`` of which the floor, the back wall (``z = length``) and the
two side walls are surfaces (rays that leave through the ceiling or the open front hit nothing).
Camera frame: OpenCV's (``x`` right, ``y`` down, ``z`` forward); a pixel ``(u, v)`` (centre at
``+0.5``) casts the ray ``((u - cx) / fx, (v - cy) / fy, 1)``, so the ray parameter of a hit is its
z-depth. Normals are returned in the NYU Depth v2 encoding: ``x`` right, ``y`` down, ``z`` towards
the camera (a wall facing the camera is ``(0, 0, 1)``).

Objects live in their own frame (``world = R @ local + centre``) and are intersected there:
spheres, boxes and pyramids (convex polytopes: slab clipping), cylinders and cones (quadrics with
caps), tori (sphere tracing on the exact signed distance, then Newton steps on the quartic).
Shading is Lambertian: ambient plus one point light, with shadow rays against every object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

INF = float("inf")
#: Object classes in their class-id order after the room's ``floor`` (0) and ``wall`` (1).
SHAPES = ("sphere", "box", "cylinder", "cone", "torus", "pyramid")
ROOM_CLASSES = ("floor", "wall")
CLASSES = ROOM_CLASSES + SHAPES
#: Room surfaces, in surface-index order (objects follow, index 4 + slot).
ROOM_SURFACES = ("floor", "back_wall", "left_wall", "right_wall")
NOISE, STRIPES, CHECKER = 0, 1, 2


@dataclass
class Scenes:
    """A batch of ``B`` scenes with up to ``K`` objects each (tensors; ``shape[b, k] = -1`` is no object).

    ``dims`` per shape (local frame, object centred at the origin, ``y`` its up axis): sphere
    ``(r, -, -)``; box half extents ``(a, b, c)``; cylinder ``(r, half height, -)``; cone ``(r, height, -)``
    (apex up); torus ``(R, r, -)`` (axis ``y``); pyramid ``(half base, height, -)`` (apex up).
    Textures per surface (4 room surfaces, then the objects): ``texture`` kind, two ``colours``
    (RGB in [0, 1]), ``frequency`` and a unit ``axis`` (stripes), ``phase`` (noise seed and offset).
    """

    room: Tensor  # B x 3: width, height, length
    camera_position: Tensor  # B x 3
    camera_rotation: Tensor  # B x 3 x 3, columns = camera x, y, z axes in the world
    intrinsics: Tensor  # B x 4: fx, fy, cx, cy
    light: Tensor  # B x 3 position
    ambient: Tensor  # B
    shape: Tensor  # B x K int64
    centre: Tensor  # B x K x 3
    rotation: Tensor  # B x K x 3 x 3 (local -> world)
    dims: Tensor  # B x K x 3
    texture: Tensor  # B x S int64
    colours: Tensor  # B x S x 2 x 3
    frequency: Tensor  # B x S
    axis: Tensor  # B x S x 3
    phase: Tensor  # B x S

    @property
    def batch(self) -> int:
        return int(self.shape.shape[0])


# -- camera ---------------------------------------------------------------------------------------
def intrinsics_from_fov(height: int, width: int, fov_x_degrees: Tensor) -> Tensor:
    """``fx, fy, cx, cy`` of square pixels with horizontal field of view ``fov_x`` (principal point centred)."""
    fov = torch.as_tensor(fov_x_degrees, dtype=torch.float64)
    fx = (width / 2.0) / torch.tan(torch.deg2rad(fov) / 2.0)
    return torch.stack([fx, fx, torch.full_like(fx, width / 2.0), torch.full_like(fx, height / 2.0)], dim=-1)


def look_at(position: Tensor, target: Tensor, roll: Tensor) -> Tensor:
    """Camera-to-world rotations (columns: right, down, forward) looking from ``position`` at ``target``."""
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    up = torch.zeros_like(forward)
    up[..., 1] = 1.0
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=-1)
    down = torch.linalg.cross(forward, right)
    c, s = torch.cos(roll)[..., None], torch.sin(roll)[..., None]
    right, down = c * right + s * down, -s * right + c * down
    return torch.stack([right, down, forward], dim=-1)


def camera_rays(scenes: Scenes, height: int, width: int) -> Tensor:
    """World ray directions ``B x P x 3`` (``P = height * width``, row-major) with unit z in the camera."""
    fx, fy, cx, cy = scenes.intrinsics.to(scenes.room.dtype).unbind(-1)
    v, u = torch.meshgrid(torch.arange(height, dtype=scenes.room.dtype) + 0.5,
                          torch.arange(width, dtype=scenes.room.dtype) + 0.5, indexing="ij")
    u, v = u.reshape(1, -1), v.reshape(1, -1)
    camera = torch.stack([(u - cx[:, None]) / fx[:, None], (v - cy[:, None]) / fy[:, None], torch.ones_like(u * fx[:, None])], -1)
    return camera @ scenes.camera_rotation.transpose(1, 2)


# -- primitives (local frame; o, d: M x 3, d need not be unit; return t: M (inf = miss), n: M x 3) ----
def _smallest_positive(candidates: list[tuple[Tensor, Tensor]], eps: float) -> tuple[Tensor, Tensor]:
    t = torch.stack([c[0] for c in candidates], 0)
    t = torch.where(t > eps, t, torch.full_like(t, INF))
    best, index = t.min(0)
    normals = torch.stack([c[1] for c in candidates], 0)
    n = normals.gather(0, index[None, :, None].expand(1, -1, 3))[0]
    return best, n


def intersect_sphere(o: Tensor, d: Tensor, dims: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    r = dims[:, 0]
    a, b, c = (d * d).sum(-1), (o * d).sum(-1), (o * o).sum(-1) - r * r
    disc = b * b - a * c
    root = torch.sqrt(disc.clamp_min(0))
    near, far = (-b - root) / a, (-b + root) / a
    t = torch.where(near > eps, near, far)
    t = torch.where((disc >= 0) & (t > eps), t, torch.full_like(t, INF))
    p = o + t[:, None].nan_to_num(posinf=0.0) * d
    return t, torch.nn.functional.normalize(p, dim=-1)


def intersect_planes(o: Tensor, d: Tensor, normals: Tensor, offsets: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Convex polytope ``{p: normals_i . p <= offsets_i}`` (normals ``M x F x 3``, offsets ``M x F``)."""
    along = (normals * d[:, None]).sum(-1)
    gap = offsets - (normals * o[:, None]).sum(-1)
    ratio = gap / along
    entering = along < 0
    t_in = torch.where(entering, ratio, torch.full_like(ratio, -INF))
    t_out = torch.where(along > 0, ratio, torch.full_like(ratio, INF))
    outside_parallel = ((along == 0) & (gap < 0)).any(-1)
    enter, face = t_in.max(-1)
    leave = t_out.min(-1).values
    hit = (enter <= leave) & (enter > eps) & ~outside_parallel
    n = normals.gather(1, face[:, None, None].expand(-1, 1, 3))[:, 0]
    return torch.where(hit, enter, torch.full_like(enter, INF)), n


def box_planes(dims: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(3, dtype=dims.dtype)
    normals = torch.cat([eye, -eye]).expand(dims.shape[0], 6, 3)
    return normals, torch.cat([dims, dims], dim=1)


def pyramid_planes(dims: Tensor) -> tuple[Tensor, Tensor]:
    """Square pyramid, base ``y = -h/2`` with half width ``a``, apex ``(0, h/2, 0)``."""
    a, h = dims[:, 0], dims[:, 1]
    m = dims.shape[0]
    normals, offsets = [], []
    for sx, sz in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        # face through the apex and the base edge at x = sx * a (or z = sz * a): n = (sx h, a, sz h)
        n = torch.stack([sx * h, a, sz * h], -1)
        norm = n.norm(dim=-1, keepdim=True)
        normals.append(n / norm)
        offsets.append((a * h / 2) / norm[:, 0])  # n . apex = a h / 2
    normals.append(torch.tensor([0.0, -1.0, 0.0], dtype=dims.dtype).expand(m, 3))
    offsets.append(h / 2)
    return torch.stack(normals, 1), torch.stack(offsets, 1)


def _caps(o: Tensor, d: Tensor, y: Tensor, radius: Tensor, up: bool) -> tuple[Tensor, Tensor]:
    t = (y - o[:, 1]) / d[:, 1]
    p = o + t[:, None] * d
    inside = (p[:, 0] ** 2 + p[:, 2] ** 2) <= radius ** 2
    n = torch.zeros_like(o)
    n[:, 1] = 1.0 if up else -1.0
    return torch.where(inside & torch.isfinite(t), t, torch.full_like(t, INF)), n


def _quadratic_hits(o: Tensor, d: Tensor, a: Tensor, b: Tensor, c: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Both roots ``t`` of ``a t^2 + 2 b t + c = 0`` along the rays, each with its point ``o + t d`` and
    whether the root is real: ``[(t, p, real), ...]`` (near root first)."""
    disc = b * b - a * c
    root = torch.sqrt(disc.clamp_min(0))
    hits = []
    for sign in (-1.0, 1.0):
        t = (-b + sign * root) / a
        hits.append((t, o + t[:, None] * d, disc >= 0))
    return hits


def intersect_cylinder(o: Tensor, d: Tensor, dims: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    r, hh = dims[:, 0], dims[:, 1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    candidates = []
    for t, p, real in _quadratic_hits(o, d, a, b, c):
        ok = real & (a > 0) & (p[:, 1].abs() <= hh)
        n = torch.stack([p[:, 0], torch.zeros_like(t), p[:, 2]], -1) / r[:, None]
        candidates.append((torch.where(ok, t, torch.full_like(t, INF)), n))
    candidates.append(_caps(o, d, hh, r, up=True))
    candidates.append(_caps(o, d, -hh, r, up=False))
    return _smallest_positive(candidates, eps)


def intersect_cone(o: Tensor, d: Tensor, dims: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Cone with apex ``(0, h/2, 0)`` and base radius ``r`` at ``y = -h/2``: ``x^2 + z^2 = k^2 (h/2 - y)^2``."""
    r, h = dims[:, 0], dims[:, 1]
    k2 = (r / h) ** 2
    s_o = h / 2 - o[:, 1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2] + k2 * s_o * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - k2 * s_o ** 2
    candidates = []
    for t, p, real in _quadratic_hits(o, d, a, b, c):
        s = h / 2 - p[:, 1]
        ok = real & (s >= 0) & (s <= h)
        n = torch.nn.functional.normalize(torch.stack([p[:, 0], k2 * s, p[:, 2]], -1), dim=-1)
        candidates.append((torch.where(ok, t, torch.full_like(t, INF)), n))
    candidates.append(_caps(o, d, -h / 2, r, up=False))
    return _smallest_positive(candidates, eps)


def torus_distance(p: Tensor, major: Tensor, minor: Tensor) -> Tensor:
    ring = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - major
    return torch.sqrt(ring ** 2 + p[:, 1] ** 2) - minor


def intersect_torus(o: Tensor, d: Tensor, dims: Tensor, eps: float = 1e-6, steps: int = 96,
                    newton: int = 4) -> tuple[Tensor, Tensor]:
    """Torus around the ``y`` axis: sphere tracing from the bounding sphere, then Newton on the quartic
    ``(|p|^2 + R^2 - r^2)^2 - 4 R^2 (x^2 + z^2) = 0``."""
    major, minor = dims[:, 0], dims[:, 1]
    length = d.norm(dim=-1)
    u = d / length[:, None]
    bound = major + minor
    b = (o * u).sum(-1)
    c = (o * o).sum(-1) - bound ** 2
    disc = b * b - c
    start = (-b - torch.sqrt(disc.clamp_min(0))).clamp_min(0)
    end = -b + torch.sqrt(disc.clamp_min(0))
    s = start.clone()
    active = disc > 0
    tolerance = 1e-5 * bound
    for _ in range(steps):
        dist = torus_distance(o + s[:, None] * u, major, minor)
        s = torch.where(active, s + dist, s)
        active = active & (dist > tolerance) & (s < end)
        if not bool(active.any()):
            break
    p = o + s[:, None] * u
    hit = (disc > 0) & (torus_distance(p, major, minor).abs() < 1e-3 * bound) & (s < end + tolerance)
    for _ in range(newton):
        p = o + s[:, None] * u
        q = (p * p).sum(-1) + major ** 2 - minor ** 2
        f = q * q - 4 * major ** 2 * (p[:, 0] ** 2 + p[:, 2] ** 2)
        df = 4 * q * (p * u).sum(-1) - 8 * major ** 2 * (p[:, 0] * u[:, 0] + p[:, 2] * u[:, 2])
        step = torch.where(hit & (df != 0), f / df, torch.zeros_like(f))
        s = s - step.clamp(-minor, minor)
    p = o + s[:, None] * u
    ring = torch.nn.functional.normalize(torch.stack([p[:, 0], torch.zeros_like(s), p[:, 2]], -1), dim=-1)
    n = torch.nn.functional.normalize(p - major[:, None] * ring, dim=-1)
    t = s / length
    return torch.where(hit & (t > eps), t, torch.full_like(t, INF)), n


def intersect_shape(shape: int, o: Tensor, d: Tensor, dims: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Nearest hit ``t`` (inf when missed) and local unit normal of rays ``o + t d`` with shape ``SHAPES[shape]``."""
    name = SHAPES[shape]
    if name == "sphere":
        return intersect_sphere(o, d, dims, eps)
    if name == "box":
        return intersect_planes(o, d, *box_planes(dims), eps)
    if name == "pyramid":
        return intersect_planes(o, d, *pyramid_planes(dims), eps)
    if name == "cylinder":
        return intersect_cylinder(o, d, dims, eps)
    if name == "cone":
        return intersect_cone(o, d, dims, eps)
    return intersect_torus(o, d, dims, eps)


def bounding_radius(shape: Tensor, dims: Tensor) -> Tensor:
    """Radius of a sphere around each object (centred at its local origin)."""
    a, b, c = dims.unbind(-1)
    radius = torch.stack([
        a,  # sphere
        torch.sqrt(a * a + b * b + c * c),  # box
        torch.sqrt(a * a + b * b),  # cylinder
        torch.sqrt(a * a + b * b / 4),  # cone
        a + b,  # torus
        torch.sqrt(2 * a * a + b * b / 4),  # pyramid
    ], -1)
    return radius.gather(-1, shape.clamp_min(0)[..., None])[..., 0] * 1.0001


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Dot product over a last axis of size 3 (faster than a reduction for such short axes)."""
    return x[..., 0] * y[..., 0] + x[..., 1] * y[..., 1] + x[..., 2] * y[..., 2]


# -- tracing --------------------------------------------------------------------------------------
def trace_objects(scenes: Scenes, origins: Tensor, directions: Tensor, t_max: Tensor,
                  eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest object hit of the rays ``origins + t directions`` (world, ``B x P x 3``: ``P`` rays
    of each scene) with ``eps < t < t_max`` (``B x P``; 0 skips a ray). Returns ``t`` (inf: none),
    the object slot (-1: none) and the world normal. Rays are first tested against every object's
    bounding sphere (all slots at once), then intersected exactly in the object's frame."""
    best = t_max.clone()
    slot = torch.full(best.shape, -1, dtype=torch.long)
    normal = torch.zeros_like(origins)
    radius = bounding_radius(scenes.shape, scenes.dims)  # B x K
    centres_t = scenes.centre.transpose(1, 2)  # B x 3 x K
    a = _dot(directions, directions)[..., None]
    b = _dot(origins, directions)[..., None] - directions @ centres_t
    c = (_dot(origins, origins)[..., None] - 2 * (origins @ centres_t)
         + (_dot(scenes.centre, scenes.centre) - radius ** 2)[:, None, :])
    disc = b * b - a * c
    root = torch.sqrt(disc.clamp_min(0))
    candidate = ((scenes.shape >= 0)[:, None, :] & (disc > 0) & ((-b + root) / a > eps)
                 & ((-b - root) / a < t_max[..., None]) & (t_max > 0)[..., None])
    for k in range(scenes.shape.shape[1]):
        image, ray = torch.nonzero(candidate[..., k], as_tuple=True)
        if len(image) == 0:
            continue
        shapes = scenes.shape[image, k]
        for s in torch.unique(shapes).tolist():
            pick = shapes == s
            bi, ri = image[pick], ray[pick]
            rotation = scenes.rotation[bi, k]
            local_o = ((origins[bi, ri] - scenes.centre[bi, k])[:, None, :] @ rotation)[:, 0]
            local_d = (directions[bi, ri][:, None, :] @ rotation)[:, 0]
            t, n_local = intersect_shape(s, local_o, local_d, scenes.dims[bi, k], eps)
            closer = t < best[bi, ri]
            bi, ri, t = bi[closer], ri[closer], t[closer]
            best[bi, ri] = t
            slot[bi, ri] = k
            normal[bi, ri] = (rotation[closer] @ n_local[closer][:, :, None])[:, :, 0]
    best = torch.where(slot >= 0, best, torch.full_like(best, INF))
    return best, slot, normal


def trace_room(scenes: Scenes, origins: Tensor, directions: Tensor, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exit of rays from inside the room box: ``t``, surface index (0 floor, 1 back, 2 left, 3 right;
    -1 for the ceiling and the open front) and the inward world normal."""
    width, height, length = scenes.room[image].unbind(-1)
    lower = torch.stack([-width / 2, torch.zeros_like(width), torch.zeros_like(width)], -1)
    upper = torch.stack([width / 2, height, length], -1)
    bound = torch.where(directions > 0, upper, lower)
    t_axis = (bound - origins) / directions
    t_axis = torch.where(directions == 0, torch.full_like(t_axis, INF), t_axis)
    t, axis = t_axis.min(-1)
    positive = torch.gather(directions, 1, axis[:, None])[:, 0] > 0
    # axis 0: x (positive -> x = +width/2), axis 1: y (negative -> floor), axis 2: z (positive -> back)
    surface = torch.full_like(axis, -1)
    surface[(axis == 1) & ~positive] = 0
    surface[(axis == 2) & positive] = 1
    surface[(axis == 0) & ~positive] = 2
    surface[(axis == 0) & positive] = 3
    normal = torch.zeros_like(origins)
    normal[torch.arange(len(axis)), axis] = torch.where(positive, -1.0, 1.0).to(origins.dtype)
    return t, surface, normal


# -- textures and shading -------------------------------------------------------------------------
def _hash(ix: Tensor, iy: Tensor, iz: Tensor, seed: Tensor) -> Tensor:
    h = ix * 73856093 ^ iy * 19349663 ^ iz * 83492791 ^ seed * 2654435761
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65535.0


def value_noise(p: Tensor, seed: Tensor) -> Tensor:
    """Smooth 3D value noise in [0, 1] at points ``N x 3`` (trilinear, smoothstep-weighted lattice)."""
    cell = torch.floor(p)
    f = p - cell
    w = f * f * (3 - 2 * f)
    i = cell.long()
    total = torch.zeros(p.shape[0], dtype=p.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = ((w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1])
                          * (w[:, 2] if dz else 1 - w[:, 2]))
                total = total + weight * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed).to(p.dtype)
    return total


def texture_pattern(kind: Tensor, point: Tensor, frequency: Tensor, axis: Tensor, phase: Tensor) -> Tensor:
    """Blend factor in [0, 1] of each point's texture: noise (2 octaves), stripes or a 3D checker."""
    q = point * frequency[:, None]
    pattern = torch.zeros_like(frequency)
    noise = torch.nonzero(kind == NOISE)[:, 0]
    seed = (phase[noise] * 1000).long()
    pattern[noise] = (0.65 * value_noise(q[noise] + phase[noise, None], seed)
                      + 0.35 * value_noise(2.03 * q[noise] + 17.0, seed + 1))
    stripes = torch.nonzero(kind == STRIPES)[:, 0]
    pattern[stripes] = 0.5 + 0.5 * torch.sin(2 * math.pi * _dot(q[stripes], axis[stripes]) + phase[stripes] * 6.283)
    checker = torch.nonzero(kind == CHECKER)[:, 0]
    pattern[checker] = (torch.floor(q[checker] + 1e-4).long().sum(-1) % 2).to(point.dtype)
    return pattern


def shade(albedo: Tensor, normal: Tensor, point: Tensor, light: Tensor, ambient: Tensor, lit: Tensor) -> Tensor:
    """Lambertian colour: ``albedo * (ambient + (1 - ambient) * max(0, n . l) * lit)``."""
    to_light = torch.nn.functional.normalize(light - point, dim=-1)
    diffuse = (normal * to_light).sum(-1).clamp_min(0) * lit
    return albedo * (ambient + (1 - ambient) * diffuse)[:, None]


@dataclass
class Rendering:
    """Per-pixel outputs of :func:`render` (``B x H x W``, colours and normals with a trailing 3)."""

    image: Tensor  # RGB in [0, 1]
    depth: Tensor  # z-depth, 0 where nothing is hit
    normals: Tensor  # camera-frame unit normals (NYU encoding), 0 where nothing is hit
    surface: Tensor  # -1 nothing, 0..3 room surfaces, 4 + k object slot k
    lit: Tensor  # 1 where the light reaches the point


def render(scenes: Scenes, height: int, width: int, shadow_eps: float = 1e-4) -> Rendering:
    """Render every scene of the batch: primary rays, textures, shadow rays, Lambertian shading."""
    batch, pixels = scenes.batch, height * width
    directions = camera_rays(scenes, height, width)  # B x P x 3
    origins = scenes.camera_position[:, None, :].expand(-1, pixels, -1)
    image = torch.arange(batch).repeat_interleave(pixels)
    t_room, room_surface, room_normal = trace_room(scenes, origins.reshape(-1, 3), directions.reshape(-1, 3), image)
    t_object, slot, object_normal = trace_objects(scenes, origins, directions, t_room.reshape(batch, pixels))
    t_object, slot, object_normal = t_object.reshape(-1), slot.reshape(-1), object_normal.reshape(-1, 3)
    directions = directions.reshape(-1, 3)
    on_object = slot >= 0
    t = torch.where(on_object, t_object, t_room)
    surface = torch.where(on_object, 4 + slot, room_surface)
    normal = torch.where(on_object[:, None], object_normal, room_normal)
    hit = surface >= 0
    point = origins.reshape(-1, 3) + torch.where(hit, t, torch.zeros_like(t))[:, None] * directions

    # textures: object surfaces in their own frame (the pattern moves with the object), room in the world
    index = surface.clamp_min(0)
    local = point.clone()
    obj = torch.nonzero(on_object)[:, 0]
    rotation = scenes.rotation[image[obj], slot[obj]]
    local[obj] = ((point[obj] - scenes.centre[image[obj], slot[obj]])[:, None, :] @ rotation)[:, 0]
    pattern = texture_pattern(scenes.texture[image, index], local, scenes.frequency[image, index],
                              scenes.axis[image, index], scenes.phase[image, index])
    colours = scenes.colours[image, index]
    albedo = colours[:, 0] + pattern[:, None] * (colours[:, 1] - colours[:, 0])

    # shadow rays towards the light, against the objects (the room is convex and holds the light)
    light = scenes.light[image]
    start = point + shadow_eps * normal
    t_shadow, _, _ = trace_objects(scenes, start.reshape(batch, pixels, 3), (light - start).reshape(batch, pixels, 3),
                                   hit.to(t.dtype).reshape(batch, pixels))
    lit = (hit & torch.isinf(t_shadow.reshape(-1))).to(t.dtype)
    colour = shade(albedo, normal, point, light, scenes.ambient[image], lit)
    colour = torch.where(hit[:, None], colour, torch.tensor([0.06, 0.06, 0.09], dtype=t.dtype)).clamp(0, 1)

    # world -> OpenCV camera frame -> NYU encoding (z towards the camera)
    camera_normal = (normal[:, None, :] @ scenes.camera_rotation[image])[:, 0]
    camera_normal = torch.nn.functional.normalize(camera_normal * torch.tensor([1.0, 1.0, -1.0], dtype=t.dtype), dim=-1)
    camera_normal = torch.where(hit[:, None], camera_normal, torch.zeros_like(camera_normal))
    shape = (batch, height, width)
    return Rendering(image=colour.reshape(*shape, 3), depth=torch.where(hit, t, torch.zeros_like(t)).reshape(shape),
                     normals=camera_normal.reshape(*shape, 3), surface=surface.reshape(shape), lit=lit.reshape(shape))
