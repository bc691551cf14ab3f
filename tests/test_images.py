"""How an image becomes the processor's 8-bit RGB (reward.to_rgb, docs/method.md section 10): real
16-bit, 32-bit and float files against a window computed here in numpy from the arrays that wrote
them; a palette against its own table; modes not handled are named. Then one 16-bit radiograph
through prepare, evaluate, sft and grpo: the pixels that reach the image processor in each stage."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

import curate
import evaluate
import grpo
import reward
import sft


def radiograph(shape=(56, 84), low=144, high=3664, seed=0) -> np.ndarray:
    """A 12-bit-range grayscale film: a smooth gradient, a round opacity and noise, as uint16."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[0], :shape[1]]
    film = low + (high - low) * (0.3 + 0.4 * x / shape[1])
    film[(y - shape[0] / 2) ** 2 + (x - shape[1] / 3) ** 2 < (shape[0] / 5) ** 2] = high
    film += rng.normal(0, 40, shape)
    return np.clip(film, low, high).astype(np.uint16)


def window(values: np.ndarray) -> np.ndarray:
    """The reference: each value's place in the image's own range, on 0..255, grey in R, G and B."""
    v = values.astype(np.float64)
    eight = np.zeros(v.shape) if v.max() == v.min() else (v - v.min()) * 255.0 / (v.max() - v.min())
    return np.repeat(np.rint(eight).astype(np.uint8)[..., None], 3, axis=-1)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


WIDE_FILES = {  # name: (array, mode PIL opens the file in, format)
    "16-bit PNG": (radiograph(), "I;16", "PNG"),
    "16-bit TIFF": (radiograph(seed=1), "I;16", "TIFF"),
    "32-bit integer TIFF": (radiograph(seed=2).astype(np.int32) * 1000 - 2_000_000, "I", "TIFF"),
    "float TIFF (Hounsfield units)": (radiograph(seed=3).astype(np.float32) / 3.0 - 1000.5, "F", "TIFF"),
}


@pytest.mark.parametrize("name", WIDE_FILES)
def test_wide_images_are_windowed_to_their_own_range(name, tmp_path):
    values, mode, fmt = WIDE_FILES[name]
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encoded(Image.fromarray(values), fmt))
    assert Image.open(path).mode == mode  # the file really holds the wide mode
    for item in (str(path), {"bytes": path.read_bytes(), "path": None}, Image.open(path)):
        rgb = np.asarray(reward.open_image(item))
        assert rgb.dtype == np.uint8 and rgb.shape == values.shape + (3,)
        np.testing.assert_array_equal(rgb, window(values))
    # What PIL's own conversion would have given the 16-bit film: clipped at 255, nearly white.
    if mode == "I;16":
        clipped = np.asarray(Image.open(path).convert("RGB"))
        assert clipped.mean() > 250 and np.asarray(reward.open_image(str(path))).std() > 40


def test_constant_wide_image_is_black_and_eight_bit_images_unchanged():
    flat = Image.fromarray(np.full((30, 30), 1234, dtype=np.uint16))
    assert np.asarray(reward.to_rgb(flat)).max() == 0
    grey = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40) % 200  # 0..199: no stretching of 8 bits
    np.testing.assert_array_equal(np.asarray(reward.to_rgb(Image.fromarray(grey))),
                                  np.repeat(grey[..., None], 3, axis=-1))


def test_palette_image_is_looked_up_in_its_palette():
    indices = (np.arange(32 * 32).reshape(32, 32) % 7).astype(np.uint8)
    table = np.array([[i * 37 % 256, (255 - i * 20) % 256, i * 11 % 256] for i in range(256)], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(table.flatten().tolist())
    image = Image.open(io.BytesIO(encoded(image, "PNG")))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(reward.open_image(image)), table[indices])


@pytest.mark.parametrize("image, message", [
    (Image.new("LAB", (30, 30)), "image mode 'LAB' is not handled"),
    (Image.new("HSV", (30, 30)), "image mode 'HSV' is not handled"),
    (Image.fromarray(np.array([[np.nan, 1.0], [2.0, 3.0]] * 15, dtype=np.float32)), "NaN or infinite"),
])
def test_modes_not_handled_are_named_with_the_row(image, message):
    row = {"question": "Q?", "options": '{"A": "a", "B": "b"}', "answer_label": "A", "answer": "a",
           "images": [image], "dataset_name": "Films", "dataset_index": 7}
    with pytest.raises(reward.RowError, match=rf"Films.*7.*{message}"):
        reward.check_row(row)


def test_a_16_bit_radiograph_keeps_its_contrast_in_every_stage(tiny_model_dir, tmp_path, monkeypatch):
    """curate.py prepare keeps the 16-bit file; evaluate, sft and grpo each hand the image processor
    the numpy window of it, never PIL's clipped white."""
    film = radiograph()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "film.png").write_bytes(encoded(Image.fromarray(film), "PNG"))
    rows = [{"question": f"Radiograph {i}: how large is the opacity?",
             "options": {"A": "Small lesion", "B": "Large lesion"}, "answer_label": "B",
             "answer": "Large lesion", "images": ["film.png"], "reasoning": "The opacity is wide.",
             "dataset_name": "Films", "dataset_index": i} for i in range(2)]
    (tmp_path / "src" / "films.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = str(tmp_path / "prepared")
    curate.main(["prepare", "--data", str(tmp_path / "src" / "films.jsonl"), "--output_dir", data])

    seen = []
    call = Qwen2VLImageProcessor.__call__

    def recording(self, *args, **kwargs):
        images = kwargs.get("images", args[0] if args else None)
        stack = [images]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            elif item is not None:
                seen.append(np.asarray(item))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLImageProcessor, "__call__", recording)
    expected = window(film)
    stages = {
        "evaluate": lambda: evaluate.main(["--model", tiny_model_dir, "--data", data, "--split", "train",
                                           "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "2"]),
        "sft": lambda: sft.main(["--model", tiny_model_dir, "--data", data, "--split", "train",
                                 "--output_dir", str(tmp_path / "sft"), "--max_steps", "1",
                                 "--global_batch_size", "2", "--micro_batch_size", "2", "--save_final", "False"]),
        "grpo": lambda: grpo.main(["--model", tiny_model_dir, "--data", data, "--output_dir", str(tmp_path / "grpo"),
                                   "--rollout_batch_size", "2", "--mini_batch_size", "2", "--group_size", "2",
                                   "--max_new_tokens", "2", "--max_steps", "1", "--eval_every", "0",
                                   "--save_final", "False"]),
    }
    for stage, run in stages.items():
        seen.clear()
        run()
        films = [image for image in seen if image.shape[:2] == film.shape]
        assert films, f"{stage}: no image of the film's size reached the processor"
        for image in films:
            np.testing.assert_array_equal(image, expected, err_msg=stage)
