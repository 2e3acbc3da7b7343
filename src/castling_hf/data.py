"""Data sets the package ships or makes, so that examples, tests and demos run offline (docs/design.md §5)."""

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")
SEGMENTATION_CLASSES = ("background", *SHAPE_CLASSES)  # class 0 of `shape_masks` is the background


def digits(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled *digits*: 1,797 real 8×8 handwritten digits, 10 classes.

    Returns a `DatasetDict` with `train` and `test` splits (stratified by label, fixed by `seed`), with columns
    `image` (a grayscale PIL image, 8×8) and `label` (`ClassLabel` with names "0" … "9").
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # The bundled values are ink counts 0..16 on a white background; images are dark digits on light paper.
    pixels = (255 - bunch.images * (255 / 16)).round().astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    dataset = Dataset.from_dict({"image": list(pixels), "label": bunch.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def digit_ink(images, size: int) -> np.ndarray:
    """Bundled 8×8 digits as ink intensity in [0, 1], `(len(images), size, size)` float32 (bilinear)."""
    ink = [1.0 - np.asarray(image, dtype=np.float32) / 255.0 for image in images]
    return np.stack([np.asarray(PILImage.fromarray(i).resize((size, size), PILImage.BILINEAR)) for i in ink])


def _paste_max(canvases: np.ndarray, patches: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> None:
    """canvases[i] = max(canvases[i], patches[i] placed with its top-left corner at (rows[i], columns[i])), for all
    i at once. `canvases` carries a margin of at least the patch size on the bottom and right."""
    size = patches.shape[-1]
    offsets = np.arange(size)
    index = (
        np.arange(len(canvases))[:, None, None],
        rows[:, None, None] + offsets[None, :, None],
        columns[:, None, None] + offsets[None, None, :],
    )
    canvases[index] = np.maximum(canvases[index], patches)


def focus_canvases(
    ink: np.ndarray,
    count: int,
    rng: np.random.Generator,
    canvas_size: int = 64,
    num_fragments: int = 2,
    noise: float = 0.1,
    digit_indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` canvases of the focus task, drawn from `ink` (`digit_ink`) with `rng`.

    Each canvas holds one whole digit at a random place among `num_fragments` fragments (random quarter- to
    half-size square crops) of other digits, plus Gaussian noise. Returns the images as
    `(count, canvas_size, canvas_size)` uint8 (dark ink on light paper) and the index into `ink` of each canvas's
    whole digit (`digit_indices` if given, otherwise drawn at random): its label is that digit's.
    """
    digit_size = ink.shape[-1]
    if digit_indices is None:
        digit_indices = rng.integers(len(ink), size=count)
    digit_indices = np.asarray(digit_indices)
    # A margin of one digit on the bottom and right takes the unused corner of every fragment's square window.
    canvases = np.zeros((count, canvas_size + digit_size, canvas_size + digit_size), dtype=np.float32)
    largest = digit_size // 2
    window = np.arange(largest)
    for _ in range(num_fragments):
        sources = rng.integers(len(ink), size=count)
        sides = rng.integers(digit_size // 4, largest + 1, size=count)
        tops, lefts = (rng.integers(0, digit_size - sides + 1) for _ in range(2))
        rows, columns = (rng.integers(0, canvas_size - sides + 1) for _ in range(2))
        inside = (window[None, :] < sides[:, None])[:, :, None] & (window[None, :] < sides[:, None])[:, None, :]
        crops = ink[
            sources[:, None, None],
            np.minimum(tops[:, None, None] + window[None, :, None], digit_size - 1),
            np.minimum(lefts[:, None, None] + window[None, None, :], digit_size - 1),
        ]
        _paste_max(canvases, np.where(inside, crops, 0.0), rows, columns)
    rows, columns = (rng.integers(0, canvas_size - digit_size + 1, size=count) for _ in range(2))
    _paste_max(canvases, ink[digit_indices], rows, columns)
    noise_values = rng.standard_normal((count, canvas_size, canvas_size), dtype=np.float32) * np.float32(noise)
    canvases = canvases[:, :canvas_size, :canvas_size] + noise_values
    return ((1.0 - np.clip(canvases, 0.0, 1.0)) * 255).round().astype(np.uint8), digit_indices


def focus_digits(
    canvas_size: int = 64,
    digit_size: int = 24,
    num_fragments: int = 2,
    noise: float = 0.1,
    train_copies: int = 8,
    seed: int = 0,
    test_copies: int = 1,
) -> DatasetDict:
    """A task that needs attention to find and focus on a small region anywhere in the image.

    Each image is a `canvas_size`² canvas with one bundled digit (`digit_size`² pixels) at a random place, among
    `num_fragments` fragments of other digits and Gaussian noise (`focus_canvases`); the label is that digit. Built
    from `digits()`, split for split, so no test digit is ever seen in training; each training digit appears on
    `train_copies` different canvases, each test digit on `test_copies`. Deterministic for a `seed`. Returns a
    `DatasetDict` (`train`, `test`) with `image` (grayscale PIL) and `label` columns.
    """
    rng = np.random.default_rng(seed)
    source = digits()

    def compose(split, copies):
        ink = digit_ink(source[split]["image"], digit_size)
        order = np.tile(np.arange(len(ink)), copies)
        images, _ = focus_canvases(ink, len(order), rng, canvas_size, num_fragments, noise, digit_indices=order)
        return Dataset.from_dict(
            {"image": list(images), "label": list(source[split]["label"]) * copies}, features=source[split].features
        )

    return DatasetDict(train=compose("train", train_copies), test=compose("test", test_copies))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _overlap(a, b) -> float:
    """Intersection over the smaller box: how much of one shape another would hide."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def shape_image(rng: np.random.Generator, image_size: int, max_objects: int, empty_fraction: float):
    """One image of coloured circles, squares and triangles on a noisy background, and its COCO boxes."""
    background = rng.integers(150, 230, size=3)
    pixels = np.clip(background + rng.normal(0, 12, size=(image_size, image_size, 3)), 0, 255).astype(np.uint8)
    image = PILImage.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    count = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    boxes, categories = [], []
    for _ in range(count * 10):  # a few tries per object; shapes must not hide each other
        if len(boxes) == count:
            break
        side = int(rng.integers(image_size // 8, image_size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, image_size - side, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, other) > 0.2 for other in boxes):
            continue
        category = int(rng.integers(len(SHAPE_CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if np.abs(np.array(colour) - background).sum() < 120:  # keep every shape visible against the background
            colour = tuple(int(255 - c) for c in colour)
        _draw_shape(draw, SHAPE_CLASSES[category], box, colour)
        boxes.append(box)
        categories.append(category)
    coco_boxes = [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes]
    return image, coco_boxes, categories


def shapes(
    num_images: int = 600,
    image_size: int = 64,
    seed: int = 0,
    max_objects: int = 3,
    empty_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DatasetDict:
    """A generated object-detection set: circles, squares and triangles of varied sizes and colours.

    Deterministic for a `seed`. A `DatasetDict` with `train` and `test` splits in the layout of the `transformers`
    object-detection examples: `image_id`, `image` (PIL), `width`, `height`, and `objects` with `id`, `area`,
    `bbox` (COCO x, y, w, h in pixels) and `category` (`ClassLabel`: circle, square, triangle). About
    `empty_fraction` of the images hold no object.
    """
    rng = np.random.default_rng(seed)
    records = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    next_object_id = 0
    for image_id in range(num_images):
        image, boxes, categories = shape_image(rng, image_size, max_objects, empty_fraction)
        ids = list(range(next_object_id, next_object_id + len(boxes)))
        next_object_id += len(boxes)
        records["image_id"].append(image_id)
        records["image"].append(image)
        records["width"].append(image_size)
        records["height"].append(image_size)
        records["objects"].append(
            {"id": ids, "area": [w * h for _, _, w, h in boxes], "bbox": boxes, "category": categories}
        )
    features = Features(
        {
            "image_id": Value("int64"),
            "image": Image(),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": {
                "id": List(Value("int64")),
                "area": List(Value("float32")),
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(SHAPE_CLASSES))),
            },
        }
    )
    dataset = Dataset.from_dict(records, features=features)
    return dataset.train_test_split(test_size=test_fraction, seed=seed)


def shape_masks(
    num_images: int = 600,
    image_size: int = 64,
    seed: int = 0,
    max_objects: int = 3,
    test_fraction: float = 0.2,
) -> DatasetDict:
    """A generated semantic-segmentation set: the images of `shapes`, each with its label map, in the layout of
    `scene_parse_150` (`image`, `annotation`): the annotation is an "L" image of class ids, 0 for the background
    and 1, 2, 3 for circle, square and triangle (`SEGMENTATION_CLASSES`), drawn with the very geometry of the image.
    Deterministic for a `seed`; `train` and `test` splits.
    """
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for _ in range(num_images):
        image, boxes, categories = shape_image(rng, image_size, max_objects, empty_fraction=0.0)
        annotation = PILImage.new("L", (image_size, image_size), 0)
        draw = ImageDraw.Draw(annotation)
        for (x, y, width, height), category in zip(boxes, categories, strict=True):
            box = (int(x), int(y), int(x + width), int(y + height))
            _draw_shape(draw, SHAPE_CLASSES[category], box, category + 1)  # in drawing order: overlaps as in the image
        images.append(image)
        annotations.append(annotation)
    dataset = Dataset.from_dict(
        {"image": images, "annotation": annotations}, features=Features({"image": Image(), "annotation": Image()})
    )
    return dataset.train_test_split(test_size=test_fraction, seed=seed)


def clean_coco_boxes(
    bboxes: list, categories: list, width: int, height: int, num_labels: int, min_size: float = 1.0
) -> tuple[list[list[float]], list[int]]:
    """COCO boxes (x, y, w, h, pixels) made safe for training: clipped to the image, and dropped where nothing of
    at least `min_size` pixels per side is left (degenerate boxes). Unknown category ids are an error, since a
    silently dropped or shifted class would train the wrong thing."""
    kept_boxes, kept_categories = [], []
    for box, category in zip(bboxes, categories, strict=True):
        if not 0 <= int(category) < num_labels:
            raise ValueError(
                f"Category id {category} is not one of the model's {num_labels} classes (0 .. {num_labels - 1}); "
                "map the data set's categories to the model's labels (id2label) first."
            )
        x, y, w, h = (float(v) for v in box)
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(width)), min(y + h, float(height))
        if x1 - x0 >= min_size and y1 - y0 >= min_size:
            kept_boxes.append([x0, y0, x1 - x0, y1 - y0])
            kept_categories.append(int(category))
    return kept_boxes, kept_categories


__all__ = [
    "SEGMENTATION_CLASSES",
    "SHAPE_CLASSES",
    "clean_coco_boxes",
    "digit_ink",
    "digits",
    "focus_canvases",
    "focus_digits",
    "shape_masks",
    "shapes",
]
