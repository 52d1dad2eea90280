"""The rooms dataset: ray-cast geometry against closed forms, ground truth, determinism, caching, and
the real dense transforms, heads, losses and metrics on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_plugins.data import build_data
from mtl_plugins.data.dense import rooms
from mtl_plugins.data.dense.render import CLASSES, SHAPES, Scenes, intrinsics_from_fov, look_at, render

H = W = 48
FOV = 60.0
ROOM = (5.0, 3.0, 6.0)  # width, height, length
CAMERA = (0.3, 1.4, 0.5)


def scene(objects=(), camera=CAMERA, target=None, fov=FOV, height=H, width=W) -> Scenes:
    """One scene, camera looking straight down +z (unless ``target``), objects as (shape, centre, dims, yaw)."""
    f64 = torch.float64
    k = max(len(objects), 1)
    shape = torch.full((1, k), -1, dtype=torch.long)
    centre, dims = torch.zeros(1, k, 3, dtype=f64), torch.zeros(1, k, 3, dtype=f64)
    rotation = torch.eye(3, dtype=f64).repeat(1, k, 1, 1)
    for i, (name, c, d, yaw) in enumerate(objects):
        shape[0, i] = SHAPES.index(name)
        centre[0, i], dims[0, i] = torch.tensor(c, dtype=f64), torch.tensor(d, dtype=f64)
        cy, sy = math.cos(yaw), math.sin(yaw)
        rotation[0, i] = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=f64)
    position = torch.tensor([camera], dtype=f64)
    target = torch.tensor([target if target is not None else (camera[0], camera[1], camera[2] + 1.0)], dtype=f64)
    surfaces = 4 + k
    return Scenes(room=torch.tensor([ROOM], dtype=f64), camera_position=position,
                  camera_rotation=look_at(position, target, torch.zeros(1, dtype=f64)),
                  intrinsics=intrinsics_from_fov(height, width, torch.tensor([fov], dtype=f64)),
                  light=torch.tensor([[0.0, 2.8, 3.0]], dtype=f64), ambient=torch.tensor([0.3], dtype=f64),
                  shape=shape, centre=centre, rotation=rotation, dims=dims,
                  texture=torch.zeros(1, surfaces, dtype=torch.long), colours=torch.rand(1, surfaces, 2, 3, dtype=f64),
                  frequency=torch.ones(1, surfaces, dtype=f64), axis=torch.tensor([[[1.0, 0, 0]] * surfaces], dtype=f64),
                  phase=torch.zeros(1, surfaces, dtype=f64))


def pixel_rays(height=H, width=W, fov=FOV):
    """Camera-frame rays of every pixel centre, written from the pinhole model."""
    f = (width / 2) / math.tan(math.radians(fov) / 2)
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return (u - width / 2) / f, (v - height / 2) / f, f


def test_depth_of_walls_floor_and_a_sphere_match_closed_forms():
    centre, radius = (0.6, 1.2, 3.0), 0.5
    r = render(scene([("sphere", centre, (radius, 0, 0), 0.0)]), H, W)
    depth, surface = r.depth[0].numpy(), r.surface[0].numpy()
    x, y, _ = pixel_rays()
    # camera looks along +z with image x = world -x and image y = world -y
    o = np.array(CAMERA)
    d = np.stack([-x, -y, np.ones_like(x)], -1)
    oc = o - np.array(centre)
    a, b, c = (d * d).sum(-1), (d * oc).sum(-1), (oc * oc).sum() - radius ** 2
    disc = b * b - a * c
    sphere_t = (-b - np.sqrt(np.clip(disc, 0, None))) / a
    on_sphere = surface == 4
    assert on_sphere.sum() > 20 and np.array_equal(on_sphere, disc > 0)
    np.testing.assert_allclose(depth[on_sphere], sphere_t[on_sphere], rtol=1e-9)
    back = surface == rooms.ROOM_SURFACE_INDEX["back_wall"]
    assert back.sum() > 100
    np.testing.assert_allclose(depth[back], ROOM[2] - CAMERA[2], rtol=1e-9)  # fronto-parallel wall: constant z
    floor = surface == rooms.ROOM_SURFACE_INDEX["floor"]
    assert floor.sum() > 100
    np.testing.assert_allclose(depth[floor], CAMERA[1] / y[floor], rtol=1e-9)  # y = 0 plane: z = h / y_image


def camera_points(depth, fov=FOV):
    x, y, _ = pixel_rays(*depth.shape, fov=fov)
    return np.stack([x * depth, y * depth, depth], -1)  # OpenCV camera frame


def normals_from_depth(depth, fov=FOV):
    """Unit normals (NYU encoding: x right, y down, z towards the camera) from back-projected depth."""
    p = camera_points(depth, fov)
    du = (p[1:-1, 2:] - p[1:-1, :-2]) / 2
    dv = (p[2:, 1:-1] - p[:-2, 1:-1]) / 2
    n = np.cross(dv, du)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    n = np.where((n * p[1:-1, 1:-1]).sum(-1, keepdims=True) > 0, -n, n)  # facing the camera
    n[..., 2] *= -1
    return n


def interior(surface):
    """Pixels (inner H-2 x W-2) whose 8 neighbours lie on the same surface."""
    s = surface
    same = np.ones((s.shape[0] - 2, s.shape[1] - 2), dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            same &= s[1 + dr : s.shape[0] - 1 + dr, 1 + dc : s.shape[1] - 1 + dc] == s[1:-1, 1:-1]
    return same & (s[1:-1, 1:-1] >= 0)


def angles(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def test_normals_equal_normals_of_back_projected_depth_on_planes_and_spheres():
    size = 96
    objects = [("sphere", (0.4, 0.8, 2.6), (0.6, 0, 0), 0.0), ("box", (-0.9, 0.4, 3.5), (0.4, 0.4, 0.4), 0.6)]
    r = render(scene(objects, target=(0.0, 0.6, 4.0), height=size, width=size), size, size)
    depth, normals, surface = r.depth[0].numpy(), r.normals[0].numpy(), r.surface[0].numpy()
    from_depth = normals_from_depth(depth)
    inner = interior(surface)
    given = normals[1:-1, 1:-1]
    np.testing.assert_allclose(np.linalg.norm(given[inner], axis=-1), 1.0, atol=1e-9)
    planar = inner & (surface[1:-1, 1:-1] < 4)
    assert planar.sum() > 1000 and angles(given[planar], from_depth[planar]).max() < 1e-4
    sphere = inner & (surface[1:-1, 1:-1] == 4)
    assert sphere.sum() > 200 and np.median(angles(given[sphere], from_depth[sphere])) < 0.5
    assert angles(given[sphere], from_depth[sphere]).max() < 3.0  # finite differences on a curved surface
    box = inner & (surface[1:-1, 1:-1] == 5)
    face = box & (angles(given, from_depth) < 1e-3)
    assert face.sum() > 0.8 * box.sum() > 30  # box faces are planes (crease pixels excepted)
    # a wall facing the camera has the NYU normal (0, 0, 1) ... seen straight on
    flat = render(scene(), H, W)
    back = flat.surface[0].numpy() == rooms.ROOM_SURFACE_INDEX["back_wall"]
    np.testing.assert_allclose(flat.normals[0].numpy()[back], np.tile([0.0, 0.0, 1.0], (back.sum(), 1)), atol=1e-9)
    floor = flat.surface[0].numpy() == rooms.ROOM_SURFACE_INDEX["floor"]
    np.testing.assert_allclose(flat.normals[0].numpy()[floor], np.tile([0.0, -1.0, 0.0], (floor.sum(), 1)), atol=1e-9)


@pytest.mark.parametrize("name, dims", [("sphere", (0.4, 0, 0)), ("box", (0.3, 0.35, 0.25)), ("cylinder", (0.3, 0.4, 0)),
                                        ("cone", (0.4, 0.9, 0)), ("torus", (0.4, 0.15, 0)), ("pyramid", (0.4, 0.8, 0))])
def test_semseg_and_saliency_of_an_object_at_its_centre_pixel(name, dims):
    centre, camera, target = (0.0, 1.4, 3.0), (0.0, 1.4, 0.5), None  # the centre ray meets every shape
    r = render(scene([(name, centre, dims, 0.4)], camera=camera, target=target), H, W)
    gt = rooms.ground_truth(r, r.surface.new_tensor([[SHAPES.index(name)]]).numpy())
    assert gt["semseg"][0, H // 2, W // 2] == CLASSES.index(name) == 2 + SHAPES.index(name)
    assert gt["saliency"][0, H // 2, W // 2] == 1
    assert gt["semseg"][0, 2, W // 2] in (CLASSES.index("wall"), 255) and gt["saliency"][0, -1, W // 2] == 0


def test_edges_follow_label_and_depth_changes_and_spare_flat_regions():
    centre, radius = (0.3, 1.4, 3.0), 0.6
    r = render(scene([("sphere", centre, (radius, 0, 0), 0.0)]), H, W)
    gt = rooms.ground_truth(r, np.array([[0]]))
    edge, surface = gt["edge"][0], r.surface[0].numpy()
    sphere = surface == 4
    # the silhouette: pixels of the sphere with a neighbour off it
    border = sphere & ~(np.roll(sphere, 1, 0) & np.roll(sphere, -1, 0) & np.roll(sphere, 1, 1) & np.roll(sphere, -1, 1))
    near = np.zeros_like(border)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= np.roll(np.roll(border, dr, 0), dc, 1)
    assert edge[border | near].sum() >= 0.8 * border.sum()  # the outline is traced
    inside = interior(surface)
    flat = np.zeros_like(edge, dtype=bool)
    flat[1:-1, 1:-1] = inside
    assert edge[flat & ~near].sum() == 0  # nothing inside the sphere, the back wall or the floor
    assert set(np.unique(edge)) == {0.0, 1.0}
    # thin: no 2 x 2 block of edge pixels
    assert not (edge[:-1, :-1] * edge[1:, :-1] * edge[:-1, 1:] * edge[1:, 1:]).any()

    # a depth step inside one surface instance is an edge; a plane seen at an angle (depth not constant,
    # inverse depth affine) is not
    v, u = np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij")
    plane = 1.0 / (0.1 + 0.01 * u + 0.02 * v)
    labels = np.zeros((20, 20), dtype=np.int64)
    assert rooms.edge_map(labels, labels, plane).sum() == 0
    step = plane.copy()
    step[:, 10:] *= 1.5
    jumps = rooms.edge_map(labels, labels, step)
    assert jumps[2:-2, 9:11].sum() >= 14 and jumps[:, :8].sum() == 0 and jumps[:, 12:].sum() == 0


def test_same_seed_same_data_other_seed_or_split_differs():
    a = rooms.generate(6, 24, 32, seed=3)
    b = rooms.generate(6, 24, 32, seed=3, chunk=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = rooms.generate(6, 24, 32, seed=4)
    d = rooms.generate(6, 24, 32, seed=3, split="test")
    for other in (c, d):
        assert not np.array_equal(a["image"], other["image"]) and not np.array_equal(a["depth"], other["depth"])
    assert a["image"].shape == (6, 24, 32, 3) and a["normals"].shape == (6, 24, 32, 3)
    counts = [len(np.unique(a["surface"][i][a["surface"][i] >= 4])) for i in range(6)]
    assert max(counts) >= 2  # objects are visible


def test_intrinsics_agree_with_image_size_and_field_of_view():
    a = rooms.generate(8, 30, 40, seed=0)
    fx, fy, cx, cy = a["intrinsics"].T
    np.testing.assert_allclose(cx, 20.0)
    np.testing.assert_allclose(cy, 15.0)
    np.testing.assert_allclose(fx, fy)
    fov = np.degrees(2 * np.arctan(20.0 / fx))
    assert (fov >= 50.0 - 1e-3).all() and (fov <= 75.0 + 1e-3).all() and fov.std() > 1.0
    k = intrinsics_from_fov(30, 40, torch.tensor([90.0]))[0].numpy()
    np.testing.assert_allclose(k, [20.0, 20.0, 20.0, 15.0], rtol=1e-6)
    # depth back-projected through the intrinsics lies on the floor plane where the label says floor:
    # the floor's camera-frame points are coplanar (fit residual ~0)
    for i in range(8):
        floor = a["semseg"][i] == 0
        if floor.sum() < 50:
            continue
        v, u = np.nonzero(floor)
        z = a["depth"][i][floor]
        p = np.stack([(u + 0.5 - cx[i]) / fx[i] * z, (v + 0.5 - cy[i]) / fy[i] * z, z], -1)
        centred = p - p.mean(0)
        assert np.linalg.svd(centred, compute_uv=False)[-1] / np.sqrt(len(p)) < 1e-4


def test_splits_are_cached_by_parameters_and_reused(tmp_path, monkeypatch):
    first = rooms.load_split("validation", size=5, height=16, width=16, seed=0, cache=tmp_path)
    calls = []
    original = rooms.generate
    monkeypatch.setattr(rooms, "generate", lambda *a, **k: calls.append(a) or original(*a, **k))
    again = rooms.load_split("validation", size=5, height=16, width=16, seed=0, cache=tmp_path)
    assert calls == [] and again["pixel_values"] == first["pixel_values"]
    other = rooms.load_split("validation", size=5, height=16, width=16, seed=1, cache=tmp_path)
    assert len(calls) == 1 and other["pixel_values"] != first["pixel_values"]
    sample = rooms.decode(first, 2)
    fresh = original(5, 16, 16, seed=0, split="validation")
    np.testing.assert_array_equal(sample["image"], fresh["image"][2])
    np.testing.assert_array_equal(sample["depth"], fresh["depth"][2])
    np.testing.assert_array_equal(sample["edge"], fresh["edge"][2])
    np.testing.assert_array_equal(sample["intrinsics"], fresh["intrinsics"][2])
    with pytest.raises(ValueError, match="unknown rooms split 'val'"):
        rooms.generate(2, split="val")
    with pytest.raises(ValueError, match="height must be a positive integer"):
        rooms.generate(2, height=0)


def test_rooms_through_the_dense_transforms_heads_losses_and_metrics(tmp_path):
    from mtl_plugins.metrics import task_metric
    from mtl_plugins.models import build_model

    data = build_data("rooms", train_size=8, eval_size=6, validation_size=4, height=32, width=32, cache=str(tmp_path))
    assert data.tasks == ["semseg", "depth", "normals", "edge", "saliency"]
    assert (len(data.train), len(data.validation), len(data.eval)) == (8, 4, 6)
    batch = data.eval[0:6]
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["semseg"].shape == (6, 32, 32) and batch["semseg"].dtype == torch.int64
    assert batch["depth"].shape == (6, 1, 32, 32) and batch["normals"].shape == (6, 3, 32, 32)
    undefined = batch["saliency"] == 255
    assert undefined.any()  # rays through the ceiling / open front
    assert torch.equal(undefined, batch["semseg"] == 255) and torch.equal(undefined, batch["depth"][:, 0] == 255)
    assert (batch["normals"][:, 0] == 255).eq(undefined).all()
    defined = ~undefined
    assert set(batch["semseg"][defined].unique().tolist()) <= set(range(len(CLASSES)))
    assert ((batch["depth"][:, 0][defined] > 0.5) & (batch["depth"][:, 0][defined] < 12)).all()
    np.testing.assert_allclose(batch["normals"].permute(0, 2, 3, 1)[defined].norm(dim=-1), 1.0, atol=1e-5)
    assert set(batch["edge"].unique().tolist()) == {0.0, 1.0}
    assert set(batch["saliency"][defined].unique().tolist()) == {0, 1}

    tiny = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 8], "depths": [1, 1], "layer_type": "basic"}
    model = build_model("hub_multitask", data.tasks, data.task_specs, backbone_config=tiny)
    out = model(**batch)
    assert set(out.losses) == set(data.tasks) and all(torch.isfinite(v) for v in out.losses.values())
    for task in data.tasks:
        assert out.logits[task].shape[-2:] == (32, 32)
        metric = task_metric(data.task_specs[task])
        metric.update(out.logits[task].detach(), batch[task])
        value = metric.compute()
        assert math.isfinite(value)
        if task in ("semseg", "saliency"):
            assert 0.0 <= value <= 100.0
        if task == "normals":
            assert 0.0 <= value <= 180.0
    # a perfect prediction scores perfectly through the same metrics
    perfect = task_metric(data.task_specs["depth"])
    perfect.update(torch.where(batch["depth"] == 255, 0.0, batch["depth"]), batch["depth"])
    assert perfect.compute() == pytest.approx(0.0, abs=1e-6)
    seg = task_metric(data.task_specs["semseg"])
    seg.update(batch["semseg"].clamp_max(len(CLASSES) - 1), batch["semseg"])
    present = len(batch["semseg"][defined].unique())
    assert seg.compute() == pytest.approx(100.0 * present / len(CLASSES))


def test_rooms_options_are_checked():
    with pytest.raises(ValueError, match="unknown rooms tasks"):
        build_data("rooms", tasks=["semseg", "sal"])
    with pytest.raises(ValueError, match="rooms: count must be a positive integer"):
        build_data("rooms", train_size=0)
