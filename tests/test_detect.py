"""The batched tensor detection path (``detect.backend = "tensor"``) against ``YOLO.predict``, on the CPU.

The model is ultralytics' ``yolov8n.yaml``, built untrained and then given batch-norm statistics measured on
the test images, saved as a ``.pt`` checkpoint and loaded like any other. Untrained as built, it scores every
box about 1e-4 and, at small sizes, every box covers the whole image, so the two paths could agree while
one of them scaled boxes wrongly; with measured statistics, boxes and scores differ from image to image.
The images are JPEGs of many sizes: some fill the letterbox as they are, others are scaled up or down,
one is very thin.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mie.launch import config as config_lib
from mie.shards.detect import DetectConfig, Detections, Detector, decode_rgb, offline_env
from mie.shards.images import ImageError

IMGSZ = 128
SIZES = [(128, 96), (96, 128), (64, 48), (200, 150), (100, 37), (30, 90), (17, 23), (128, 96), (64, 48),
         (333, 250), (128, 128)]
RTOL, PX = 1e-3, 0.5  # scores relative, boxes in pixels
# Added to the measured variances: small enough that outputs differ by image, large enough that a grey level
# of difference in the input (OpenCV's fixed-point resize vs. torch's) moves scores by < 1e-3 relative.
VAR_FLOOR = 0.01


def shapes_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG of a few filled rectangles and ellipses in random colours on a random background."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = sorted(rng.integers(0, w + 1, 2))
        y0, y1 = sorted(rng.integers(0, h + 1, 2))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [shapes_jpeg(size, seed=i) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def images(blobs) -> list:
    return [decode_rgb(b) for b in blobs]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images) -> str:
    """yolov8n whose batch-norm statistics are those of the test images (letterboxed by ultralytics), with
    a variance floor so that near-constant channels do not amplify rounding noise, and class biases at 0
    so that scores spread around 0.5."""
    offline_env()
    import torch
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(IMGSZ, auto=False)
    x = torch.from_numpy(np.stack([letterbox(image=np.asarray(im)) for im in images])).permute(0, 3, 1, 2) / 255
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = YOLO("yolov8n.yaml")
    net = model.model
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None  # a plain average over what it sees
    net.train()
    with torch.no_grad():
        net(x.float())
    net.eval()
    head = net.model[-1]
    with torch.no_grad():
        for m in norms:
            m.running_var += VAR_FLOOR
        for cls in head.cv3:
            cls[-1].bias.zero_()
    path = tmp_path_factory.mktemp("detect") / "yolov8n-calibrated.pt"
    model.save(path)
    return str(path)


def detector(checkpoint: str, backend: str, **cfg) -> Detector:
    return Detector(config_lib.from_dict(DetectConfig, {
        "model": checkpoint, "imgsz": IMGSZ, "conf": 0.0, "top_k": 5, "batch_size": 4, "backend": backend,
        "decode_workers": 2, **cfg}))


def assert_same(a: list[Detections], b: list[Detections]) -> None:
    """Same detections within RTOL / PX. Scores are compared rank by rank; each box must have a partner of
    the same class, score and place in the other list, unless its score ties the last one kept (then
    rounding may have put it on either side of the top-K cut)."""
    assert len(a) == len(b)
    for n, (x, y) in enumerate(zip(a, b)):
        assert len(x.scores) == len(y.scores) == 5, n
        np.testing.assert_allclose(x.scores, y.scores, rtol=RTOL, err_msg=f"image {n}")
        for p, q in ((x, y), (y, x)):
            cut = min(q.scores) * (1 + RTOL)
            for box, score, cls in zip(p.boxes, p.scores, p.classes):
                partners = [j for j in range(len(q.scores)) if q.classes[j] == cls
                            and abs(q.scores[j] - score) <= RTOL * score
                            and np.abs(np.subtract(q.boxes[j], box)).max() <= PX]
                assert partners or score <= cut, f"image {n}: {box} {score} {cls} not in {q}"


def test_letterbox_matches_ultralytics(checkpoint, images):
    from ultralytics.data.augment import LetterBox

    x, sizes = detector(checkpoint, "tensor").letterbox(images)
    assert x.shape == (len(images), 3, IMGSZ, IMGSZ) and x.dtype.is_floating_point
    assert sizes == [(im.height, im.width) for im in images]
    ours = (x * 255).round().to(dtype=__import__("torch").uint8).permute(0, 2, 3, 1).numpy()
    letterbox = LetterBox(IMGSZ, auto=False, stride=32)
    for im, got in zip(images, ours):
        want = letterbox(image=np.asarray(im)[..., ::-1].copy())[..., ::-1]  # predict's BGR order and back
        diff = np.abs(got.astype(int) - want.astype(int))
        if max(im.size) == IMGSZ:  # fills the letterbox as it is: no resize, the same pixels
            assert not diff.any(), im.size
        else:  # bilinear in floats vs OpenCV's fixed point: at most one grey level, on a few pixels
            assert diff.max() <= 1 and (diff > 0).mean() < 0.25, im.size


def test_tensor_path_matches_predict(checkpoint, images):
    tensor = detector(checkpoint, "tensor")(images)
    predict = detector(checkpoint, "predict")(images)
    assert_same(tensor, predict)
    # the comparison can fail: boxes and scores differ from image to image and are not the whole image
    inner = [b for d, im in zip(tensor, images) for b in d.boxes if b != [0.0, 0.0, im.width, im.height]]
    assert len({tuple(b) for b in inner}) > len(images)
    assert len({c for d in tensor for c in d.classes}) >= 5 and len({d.classes[0] for d in tensor}) >= 3
    # the contract of det.json: top-K, best first, in pixels of the image
    for d, im in zip(tensor, images):
        assert d.scores == sorted(d.scores, reverse=True)
        assert all(0 <= b[0] <= b[2] <= im.width and 0 <= b[1] <= b[3] <= im.height for b in d.boxes)
        assert all(isinstance(c, int) and 0 <= c < 80 for c in d.classes)


def test_tensor_path_does_not_depend_on_batch_composition(checkpoint, images):
    ref = detector(checkpoint, "tensor", batch_size=len(images))(images)
    for batch_size in (1, 3):
        assert_same(detector(checkpoint, "tensor", batch_size=batch_size)(images), ref)
    order = list(reversed(range(len(images))))  # other neighbours, other size groups in each batch
    shuffled = detector(checkpoint, "tensor", batch_size=4)([images[i] for i in order])
    assert_same([shuffled[order.index(i)] for i in range(len(images))], ref)


@pytest.mark.parametrize("backend", ["tensor", "predict"])
def test_encoded_images_in_boxes_out(checkpoint, blobs, images, backend):
    det = detector(checkpoint, backend, batch_size=2)  # 7 batches: decoding runs ahead of the device
    got = det.detect_encoded(iter(blobs[:4] + [b"this is no JPEG", blobs[4][:20]] + blobs[4:]))
    assert len(got) == len(blobs) + 2
    assert str(got[4]).startswith("UnidentifiedImageError: ") and isinstance(got[5], ImageError)  # a whole batch
    assert_same(got[:4] + got[6:], det(images))  # batched otherwise: the bad ones are left out of their batch
    decoded = det.decode([blobs[0], b"", blobs[1]])
    assert isinstance(decoded[1], ImageError)
    assert [np.asarray(d).tolist() for d in (decoded[0], decoded[2])] == [np.asarray(im).tolist() for im in images[:2]]


def test_backend_is_checked():
    with pytest.raises(config_lib.ConfigError, match="backend"):
        config_lib.from_dict(DetectConfig, {"backend": "onnx"})
    with pytest.raises(config_lib.ConfigError, match="decode_workers"):
        config_lib.from_dict(DetectConfig, {"decode_workers": -1})
