"""PNG image folders with same-named masks: reading, writing, and bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from meddiff.data.images import (
    check_headers,
    list_pngs,
    load_folder,
    mask_paths,
    read_mask,
    read_png,
    write_png,
)
from meddiff.errors import DataError


def test_8_and_16_bit_pngs_read_as_unit_floats(tmp_path):
    Image.fromarray(np.array([[0, 51], [255, 102]], dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 65535], [13107, 32768]], dtype=np.uint16)).save(
        tmp_path / "b.png"
    )
    np.testing.assert_allclose(read_png(tmp_path / "a.png"), [[0, 0.2], [1, 0.4]], atol=1e-6)
    np.testing.assert_allclose(
        read_png(tmp_path / "b.png"), [[0, 1], [0.2, 32768 / 65535]], atol=1e-6
    )


@pytest.mark.parametrize("bits", [8, 16])
def test_write_read_round_trip(tmp_path, bits):
    rng = np.random.default_rng(0)
    img = rng.random((5, 7)).astype(np.float32)
    write_png(tmp_path / "x.png", img, bits=bits)
    back = read_png(tmp_path / "x.png")
    assert back.shape == (5, 7)
    np.testing.assert_allclose(back, img, atol=0.5 / (2**bits - 1) + 1e-7)
    assert not list(tmp_path.glob(".*partial*"))  # no temporary file left behind


def test_masks_are_nonzero_pixels(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 2] = 1  # any non-zero value counts, not only 255
    mask[3, 3] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.png", (4, 4))
    assert got.sum() == 2 and got[1, 2] and got[3, 3]
    write_png(tmp_path / "w.png", got)
    assert np.array_equal(read_mask(tmp_path / "w.png"), got)


def test_load_folder_pairs_images_and_masks_by_name(tmp_path):
    for name in ("b.png", "a.png"):
        write_png(tmp_path / "img" / name, np.full((8, 8), 0.5))
        write_png(tmp_path / "msk" / name, np.eye(8, dtype=bool))
    (tmp_path / "img" / ".DS_Store").write_text("ignored")
    s = load_folder(tmp_path / "img", tmp_path / "msk", size=8)
    assert s.names == ["a.png", "b.png"]
    assert s.images.shape == (2, 8, 8) and s.masks.shape == (2, 8, 8)
    assert s.masks.sum() == 16


def test_non_png_in_the_folder_is_named(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4)))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: not a PNG"):
        list_pngs(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        list_pngs(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_pngs(tmp_path / "nope")


def test_colour_image_is_a_channel_error(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png: image has 3 channels"):
        read_png(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((4, 4, 2), dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    with pytest.raises(DataError, match=r"la\.png: mask has 2 channels"):
        read_mask(tmp_path / "la.png")


def test_wrong_size_and_fake_png(tmp_path):
    write_png(tmp_path / "small.png", np.zeros((4, 6)))
    with pytest.raises(DataError, match=r"small\.png: image is 6x4 pixels; expected 8x8"):
        read_png(tmp_path / "small.png", size=8)
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"fake\.png: not a readable PNG"):
        read_png(tmp_path / "fake.png")


def test_mask_size_mismatch_and_missing_mask_name_the_file(tmp_path):
    write_png(tmp_path / "img" / "a.png", np.zeros((8, 8)))
    write_png(tmp_path / "img" / "b.png", np.zeros((8, 8)))
    write_png(tmp_path / "msk" / "a.png", np.zeros((4, 8), dtype=bool))
    with pytest.raises(DataError, match=r"no mask for image .*b\.png"):
        mask_paths(list_pngs(tmp_path / "img"), tmp_path / "msk")
    write_png(tmp_path / "msk" / "b.png", np.zeros((8, 8), dtype=bool))
    with pytest.raises(DataError, match=r"msk/a\.png: mask is 8x4 pixels but its image is 8x8"):
        load_folder(tmp_path / "img", tmp_path / "msk")
    # The same checks from the PNG headers alone, before any pixel is decoded.
    files = list_pngs(tmp_path / "img")
    with pytest.raises(DataError, match=r"msk/a\.png: mask is 8x4 pixels but its image is 8x8"):
        check_headers(files, 8, mask_paths(files, tmp_path / "msk"))
    with pytest.raises(DataError, match=r"img/a\.png: image is 8x8 pixels; expected 16x16"):
        check_headers(files, 16)


def test_mixed_sizes_in_one_folder(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8)))
    write_png(tmp_path / "b.png", np.zeros((9, 8)))
    with pytest.raises(DataError, match=r"b\.png: image is 8x9 pixels but a\.png is 8x8"):
        load_folder(tmp_path)


# --- bit depth: 12-bit data in 16-bit PNGs -----------------------------------------------------


def _slice(seed: int = 0) -> np.ndarray:
    """A float image in [0, 1] with mean about 0.21, like an MRI slice (dark background)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2) < 24**2
    return np.where(disc, 0.4 + 0.2 * rng.random((64, 64)), 0.0)


def _png16(path, values: np.ndarray, sbit: int | None = None):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return path


def test_12_bit_png_with_sbit_reads_over_its_own_range(tmp_path):
    from meddiff.data.images import png_significant_bits

    img = _slice()
    path = _png16(tmp_path / "scan.png", np.round(img * 4095), sbit=12)
    assert png_significant_bits(path) == 12
    out = read_png(path)
    assert out.mean() == pytest.approx(img.mean(), abs=1e-3)  # not 1/16 of it
    assert out.mean() > 0.15
    # The PNG standard's way: the 12 bits scaled to 16 by bit replication, shifted back.
    v = np.round(img * 4095).astype(np.int64)
    replicated = _png16(tmp_path / "std.png", (v << 4) | (v >> 8), sbit=12)
    np.testing.assert_allclose(read_png(replicated), out, atol=1e-6)


def test_12_bit_png_without_sbit_reads_over_12_bits_and_says_so(tmp_path, caplog):
    from meddiff.config.data import ImageConfig
    from meddiff.data.images import intensity_summary, png_significant_bits

    img = _slice()
    path = _png16(tmp_path / "scan.png", np.round(img * 4095))
    assert png_significant_bits(path) is None
    with caplog.at_level("INFO"):
        summary = intensity_summary([path], ImageConfig())
    assert summary["warning"] is None  # read right, not "nearly black"
    assert summary["read_as"] == {"no sBIT, values fit in 12 bits: 12-bit / 4095": 1}
    assert "read as 12-bit" in caplog.text
    assert read_png(path).mean() == pytest.approx(img.mean(), abs=1e-3)  # not 1/16 of it
    np.testing.assert_array_equal(
        read_png(path), read_png(path, cfg=ImageConfig(significant_bits=12))
    )
    # The file's own range, as before, when asked for.
    full = read_png(path, cfg=ImageConfig(significant_bits=16))
    assert full.mean() == pytest.approx(img.mean() / 16, rel=0.01)
    with caplog.at_level("WARNING"):
        assert (
            "significant_bits=12"
            in intensity_summary([path], ImageConfig(significant_bits=16))["warning"]
        )
    observed = read_png(path, cfg=ImageConfig(scaling="observed_range"))
    assert observed.min() == 0 and observed.max() == 1
    pct = read_png(path, cfg=ImageConfig(scaling="percentiles", percentiles=(1, 99)))
    assert pct.max() == 1 and 0.2 < pct.mean() < 0.5


def test_a_folder_mixing_12_and_16_bit_values_is_warned_about(tmp_path, caplog):
    from meddiff.config.data import ImageConfig
    from meddiff.data.images import intensity_summary

    a = _png16(tmp_path / "a.png", np.round(_slice(0) * 4095))
    b = _png16(tmp_path / "b.png", np.round(_slice(1) * 65535))
    assert read_png(b).mean() == pytest.approx(_slice(1).mean(), abs=1e-3)  # 16-bit: as it is
    with caplog.at_level("WARNING"):
        summary = intensity_summary([a, b], ImageConfig())
    assert "1 of 2 sampled 16-bit images" in summary["warning"]
    assert "data.images.significant_bits" in caplog.text
    # A dark 16-bit image beyond 12 bits still reads as 16-bit, and warns that it is dark.
    dark = _png16(tmp_path / "dark.png", np.round(_slice() / 0.6 * 6000))  # max 6000
    assert "reads nearly black" in intensity_summary([dark], ImageConfig())["warning"]


def test_explicit_scaling_wins_over_sbit_and_a_wrong_sbit_is_named(tmp_path):
    from meddiff.config.data import ImageConfig

    img = _slice()
    path = _png16(tmp_path / "scan.png", np.round(img * 4095), sbit=12)
    full = read_png(path, cfg=ImageConfig(scaling="type_range"))
    assert full.mean() == pytest.approx(img.mean() / 16, rel=0.01)
    lying = _png16(tmp_path / "lying.png", np.round(img * 65535), sbit=10)
    with pytest.raises(DataError, match=r"lying\.png: sBIT says 10 significant bits.*type_range"):
        read_png(lying)
    np.testing.assert_allclose(
        read_png(lying, cfg=ImageConfig(scaling="type_range")), img, atol=1e-4
    )


def test_training_reads_pngs_as_detection_does(tmp_path):
    """The training stage and detection call one reader with one setting."""
    from meddiff.config.data import ImageConfig
    from meddiff.thor.data import ReadPng

    path = _png16(tmp_path / "scan.png", np.round(_slice() * 4095))
    cfg = ImageConfig(significant_bits=12)
    batch = ReadPng(64, cfg)({"path": np.array([str(path)])})
    np.testing.assert_array_equal(batch["image"][0], read_png(path, 64, cfg))
    assert batch["image"][0].mean() > 0.15


def test_detection_refuses_to_read_images_unlike_training(tmp_path):
    from meddiff.config import load_config
    from meddiff.config.data import ImageConfig
    from meddiff.config.thor import ScheduleConfig, UNetConfig
    from meddiff.errors import ConfigError
    from meddiff.thor.detect import plan_for
    from meddiff.thor.model import save_model
    from meddiff.thor.unet import DiffusionUNet

    small = UNetConfig(
        image_size=16, channels=(8, 16), attention_levels=(False, True), norm_groups=8,
        num_head_channels=8,
    )  # fmt: skip
    trained = ImageConfig(significant_bits=12).reading()
    out = save_model(
        tmp_path / "m", DiffusionUNet(small), small, ScheduleConfig(), {"intensity": trained}
    )
    cfg = load_config("tiny", overrides=["thor.infer.lpips=off"])
    with pytest.raises(
        ConfigError, match=r"trained on images read.*--set data\.images\.significant_bits=12"
    ):
        plan_for(cfg, str(out))
    same = load_config(
        "tiny", overrides=["thor.infer.lpips=off", "data.images.significant_bits=12"]
    )
    assert plan_for(same, str(out))["image_size"] == 16


def _bomb_png(path, side: int = 100_000):
    """A PNG whose header claims side × side pixels (far above Pillow's limit); no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_a_decompression_bomb_header_is_refused_naming_the_file(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8)))
    bomb = _bomb_png(tmp_path / "huge.png")
    for read in (lambda: check_headers(list_pngs(tmp_path), 8), lambda: read_png(bomb)):
        with pytest.raises(DataError, match=r"huge\.png: refused as a decompression bomb"):
            read()


def test_rgba_png_error_is_said_once(tmp_path):
    """One message naming the file once, not wrapped again as 'not a readable PNG'."""
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    for read in (read_png, lambda p: check_headers([p])):
        with pytest.raises(DataError) as err:
            read(tmp_path / "rgba.png")
        msg = str(err.value)
        assert msg.count("rgba.png") == 1 and "not a readable PNG" not in msg
        assert "4 channels (mode RGBA)" in msg


def test_a_4d_volume_is_refused_on_the_driver_before_ray(tmp_path, monkeypatch):
    import nibabel as nib
    import ray
    import ray.data

    def no_ray_work(*args, **kwargs):
        raise AssertionError("a Ray dataset was built before the header check")

    monkeypatch.setattr(ray.data, "from_items", no_ray_work)
    was_up = ray.is_initialized()  # the integration tier's shared Ray may already run

    from meddiff.config.data import MriConfig
    from meddiff.thor.data import healthy_dataset

    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(tmp_path / "4d.nii")
    )
    with pytest.raises(DataError, match=r"4d\.nii: volume has shape \(8, 8, 8, 3\); expected a 3D"):
        healthy_dataset(tmp_path / "4d.nii", 16, MriConfig())
    # Failed before any Ray work (no worker tracebacks).
    assert ray.is_initialized() == was_up


def test_ray_data_console_drops_records_about_user_errors():
    import logging
    import sys

    from meddiff.runtime import UserErrorFilter

    class Wrapped(Exception):  # how Ray re-raises a stage's error: the original as cause
        pass

    def record(exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("ray.data.x", logging.ERROR, __file__, 1, "failed", (), info)

    wrapped = Wrapped("task failed")
    wrapped.__cause__ = DataError("bad.png: not a readable PNG")
    keep = UserErrorFilter()
    assert not keep.filter(record(wrapped))
    assert keep.filter(record(RuntimeError("a bug in Ray")))
    assert keep.filter(record(None))
    try:  # a plain error() call inside the except block that caught a user error
        raise wrapped
    except Wrapped:
        assert sys.exc_info()[1] is wrapped and not keep.filter(record(None))
