"""x2x_jax.data.io: PNG / JPEG / DICOM loading, model geometry, round trip and error cases (inputs made here)."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, generate_uid

from x2x_jax.data import io as xio
from x2x_jax.errors import DataError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------


def write_png(path, arr):
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_raw_png(path, arr, bit_depth, color_type):
    """A minimal PNG written by hand (Pillow cannot write 16-bit colour)."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[i].astype(dtype).tobytes() for i in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def dicom_dataset(stored, photometric="MONOCHROME2", bits_stored=12, bits_allocated=16, syntax=None, **tags):
    file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    file_meta.MediaStorageSOPClassUID = DX_STORAGE
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("test.dcm", {}, file_meta=file_meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    dtype = "<u2" if bits_allocated == 16 else "u1"
    ds.PixelData = stored.astype(dtype).tobytes()
    return ds


def write_dicom(path, stored, **kw):
    dicom_dataset(stored, **kw).save_as(path, enforce_file_format=True)
    return path


def gradient(h, w, top, dtype=np.uint16):
    """Rows brighten from top to bottom ("bone at the bottom"), with a little left-right ramp too."""
    y = np.linspace(0.0, 1.0, h)[:, None]
    x = np.linspace(0.0, 0.1, w)[None, :]
    return np.rint((0.9 * y + x) / 1.0 * top).astype(dtype)


def assert_png(path, height, width, bit_depth):
    header = path.read_bytes()[:33]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color_type = struct.unpack(">IIBB", header[16:26])
    assert (h, w, depth, color_type) == (height, width, bit_depth, 0)  # grey


# ---------------------------------------------------------------------------------------------------------
# Geometry (pure helpers)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, size, box", [
    ((512, 512), 512, (0, 0, 512, 512)),
    ((300, 200), 64, (0, 10, 64, 43)),      # 200 * 64 / 300 = 42.67 -> 43; pad 21 = 10 left + 11 right
    ((200, 300), 64, (10, 0, 43, 64)),      # landscape: pads top / bottom
    ((64, 40), 64, (0, 12, 64, 40)),        # long side already at size: nothing resampled
    ((3000, 2500), 512, (0, 42, 512, 427)),
    ((1, 1000), 16, (7, 0, 1, 16)),         # extreme aspect: the short side never collapses to 0
])
def test_content_box_pad(hw, size, box):
    assert xio.content_box(*hw, size, "pad") == box


def test_content_box_stretch_and_bad_args():
    assert xio.content_box(300, 200, 64, "stretch") == (0, 0, 64, 64)
    with pytest.raises(ValueError, match="fit"):
        xio.content_box(10, 10, 8, "crop")
    with pytest.raises(ValueError, match="size"):
        xio.content_box(10, 10, 0)
    with pytest.raises(ValueError, match="size"):
        xio.resize_to_model(np.zeros((4, 4)), 8.0)


def test_resize_to_model_is_pure_and_deterministic():
    rng = np.random.default_rng(0)
    arr = rng.random((90, 60))
    before = arr.copy()
    a = xio.resize_to_model(arr, 32, "pad")
    b = xio.resize_to_model(arr, 32, "pad")
    np.testing.assert_array_equal(arr, before)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32) and a.dtype == np.float32
    top, left, h, w = xio.content_box(90, 60, 32, "pad")
    content = a[top:top + h, left:left + w]
    assert content.min() >= arr.min() - 1e-6 and content.max() <= arr.max() + 1e-6  # no Lanczos overshoot
    assert np.all(a[:, :left] == 0.0) and np.all(a[:, left + w:] == 0.0)
    assert np.all(xio.resize_to_model(arr, 32, "pad", pad_value=-1.0)[:, :left] == -1.0)
    stretched = xio.resize_to_model(arr, 32, "stretch")
    assert stretched.shape == (32, 32) and not np.any(stretched == 0.0)


def test_resize_to_model_identity_and_smooth_resampling():
    arr = np.linspace(0, 1, 48 * 48).reshape(48, 48)
    np.testing.assert_array_equal(xio.resize_to_model(arr, 48), arr.astype(np.float32))
    # A linear ramp stays (close to) a linear ramp when shrunk: the mean is preserved.
    small = xio.resize_to_model(arr, 16, "stretch")
    assert abs(small.mean() - arr.mean()) < 1e-3
    assert np.all(np.diff(small[:, 0]) > 0)


def test_resize_to_model_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        xio.resize_to_model(np.zeros((4, 4, 3)), 8)
    with pytest.raises(ValueError, match="NaN"):
        xio.resize_to_model(np.full((4, 4), np.nan), 8)


# ---------------------------------------------------------------------------------------------------------
# PNG / JPEG
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, top, mode", [(np.uint8, 255, "L"), (np.uint16, 65535, "I;16")])
def test_png_at_model_size_round_trips_exactly(tmp_path, dtype, top, mode):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, top + 1, size=(64, 64)).astype(dtype)
    arr[0, 0], arr[0, 1] = 0, top
    src = write_png(tmp_path / "in.png", arr)

    image, meta = xio.load_image(src, 64)
    assert image.shape == (64, 64) and image.dtype == np.float32
    np.testing.assert_allclose(image, arr / top * 2.0 - 1.0, atol=1e-6)
    assert image.min() == -1.0 and image.max() == 1.0
    bits = 8 if dtype == np.uint8 else 16
    assert (meta.kind, meta.bit_depth, meta.mode, meta.channels) == ("png", bits, mode, 1)
    assert (meta.height, meta.width, meta.size, meta.fit, meta.content_box) == (64, 64, 64, "pad", (0, 0, 64, 64))
    assert meta.window == (0.0, float(top)) and meta.window_source == "full-range"

    out = xio.save_like(xio.to_original(image, meta), meta, tmp_path / "out.png")
    assert_png(out, 64, 64, bits)
    back = np.asarray(Image.open(out))
    assert back.dtype == arr.dtype
    assert np.abs(back.astype(np.int64) - arr).max() <= 1  # in fact exact
    np.testing.assert_array_equal(back, arr)


def test_png_long_side_at_model_size_round_trips_exactly(tmp_path):
    arr = gradient(64, 40, 65535)
    src = write_png(tmp_path / "tall.png", arr)
    image, meta = xio.load_image(src, 64)
    assert meta.content_box == (0, 12, 64, 40)
    assert np.all(image[:, :12] == -1.0) and np.all(image[:, 52:] == -1.0)
    out = xio.save_like(image, meta, tmp_path / "out.png")  # model-size input: to_original applied inside
    np.testing.assert_array_equal(np.asarray(Image.open(out)), arr)


@pytest.mark.parametrize("hw", [(300, 200), (200, 300), (97, 131)])
def test_png_non_square_resampled_round_trip(tmp_path, hw):
    h, w = hw
    arr = gradient(h, w, 255, np.uint8)
    src = write_png(tmp_path / "in.png", arr)
    image, meta = xio.load_image(src, 64)
    assert image.shape == (64, 64) and -1.0 <= image.min() and image.max() <= 1.0
    top, left, ch, cw = meta.content_box
    assert max(ch, cw) == 64
    if h > w:
        assert np.all(image[:, :left] == -1.0) and np.all(image[:, left + cw:] == -1.0)
    else:
        assert np.all(image[:top] == -1.0) and np.all(image[top + ch:] == -1.0)

    restored = xio.to_original(image, meta)
    assert restored.shape == (h, w) and restored.dtype == np.float32
    out = xio.save_like(restored, meta, tmp_path / "out.png")
    assert_png(out, h, w, 8)
    back = np.asarray(Image.open(out)).astype(np.int64)
    # Smooth image: down- then up-sampling error of a few LSB (worst at the borders).
    assert np.abs(back - arr).max() <= 4
    assert np.abs(back - arr).mean() < 1.0


def test_stretch_fit(tmp_path):
    arr = gradient(120, 60, 65535)
    src = write_png(tmp_path / "in.png", arr)
    image, meta = xio.load_image(src, 32, fit="stretch")
    assert meta.content_box == (0, 0, 32, 32) and meta.scale == (32 / 120, 32 / 60)
    assert image.min() > -1.0  # no black padding anywhere (the gradient starts at 0 only in one corner pixel)
    restored = xio.to_original(image, meta)
    assert restored.shape == (120, 60)
    assert np.abs((restored + 1) / 2 * 65535 - arr).max() < 0.03 * 65535


def test_rgb_png_is_luminance(tmp_path):
    grey = gradient(40, 30, 255, np.uint8)
    write_png(tmp_path / "grey.png", grey)
    write_png(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    write_png(tmp_path / "rgba.png", np.dstack([grey, grey, grey, np.full_like(grey, 7)]))
    g, _ = xio.load_array(tmp_path / "grey.png")
    rgb, meta = xio.load_array(tmp_path / "rgb.png")
    rgba, meta_a = xio.load_array(tmp_path / "rgba.png")
    np.testing.assert_allclose(rgb, g, atol=1e-6)
    np.testing.assert_allclose(rgba, g, atol=1e-6)  # alpha ignored
    assert (meta.mode, meta.channels, meta.bit_depth) == ("RGB", 3, 8)
    assert (meta_a.mode, meta_a.channels) == ("RGBA", 4)

    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    r, _ = xio.load_array(write_png(tmp_path / "red.png", red))
    np.testing.assert_allclose(r, 0.299, atol=1e-6)


def test_other_png_modes(tmp_path):
    grey = gradient(16, 24, 255, np.uint8)
    la, meta_la = xio.load_array(write_png(tmp_path / "la.png", np.dstack([grey, grey // 2])))
    np.testing.assert_allclose(la, grey / 255.0, atol=1e-6)
    assert meta_la.mode == "LA"

    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    pal, meta_p = xio.load_array(tmp_path / "p.png")
    assert meta_p.mode == "P" and pal.shape == (16, 24)
    np.testing.assert_allclose(pal, grey / 255.0, atol=1e-6)  # a grey palette maps back exactly

    Image.fromarray(grey > 128).save(tmp_path / "bw.png")
    bw, meta_1 = xio.load_array(tmp_path / "bw.png")
    assert meta_1.mode == "1" and set(np.unique(bw)) == {0.0, 1.0}


def test_16bit_rgb_png_keeps_bit_depth(tmp_path):
    grey16 = gradient(10, 12, 65535)
    src = write_raw_png(tmp_path / "rgb16.png", np.stack([grey16] * 3, axis=-1), 16, 2)
    arr, meta = xio.load_array(src)
    assert meta.bit_depth == 16 and meta.mode == "RGB" and meta.window == (0.0, 255.0)
    np.testing.assert_allclose(arr, grey16 / 65535.0, atol=1 / 255)  # Pillow decodes it at 8-bit precision


def test_jpeg_loads_and_saves_8bit_png(tmp_path):
    arr = gradient(80, 50, 255, np.uint8)
    src = tmp_path / "in.jpg"
    Image.fromarray(arr).save(src, format="JPEG", quality=100)
    image, meta = xio.load_image(src, 80)
    assert (meta.kind, meta.bit_depth, meta.mode) == ("jpeg", 8, "L")
    assert meta.content_box == (0, 15, 80, 50)
    restored = xio.to_original(image, meta)
    np.testing.assert_allclose((restored + 1) / 2 * 255, arr, atol=3)  # JPEG quality 100 is near-lossless
    out = xio.save_like(image, meta, tmp_path / "out.png")
    assert_png(out, 80, 50, 8)

    rgb_src = tmp_path / "rgb.jpeg"
    Image.fromarray(np.stack([arr] * 3, axis=-1)).save(rgb_src, format="JPEG", quality=100)
    rgb, rgb_meta = xio.load_array(rgb_src)
    assert rgb_meta.mode == "RGB" and rgb.shape == (80, 50)
    np.testing.assert_allclose(rgb * 255, arr, atol=3)


def test_content_wins_over_extension(tmp_path):
    arr = gradient(20, 20, 255, np.uint8)
    misnamed = tmp_path / "actually_png.jpg"
    Image.fromarray(arr).save(misnamed, format="PNG")
    loaded, meta = xio.load_array(misnamed)
    assert meta.kind == "png"
    np.testing.assert_allclose(loaded, arr / 255.0, atol=1e-6)

    dicom_named_png = write_dicom(tmp_path / "scan.png", gradient(20, 20, 4095))
    _, dmeta = xio.load_array(dicom_named_png)
    assert dmeta.kind == "dicom"


def test_load_array_meta_and_to_original_needs_geometry(tmp_path):
    arr = gradient(30, 20, 65535)
    src = write_png(tmp_path / "in.png", arr)
    loaded, meta = xio.load_array(src)
    assert loaded.shape == (30, 20) and loaded.dtype == np.float32
    assert 0.0 <= loaded.min() and loaded.max() <= 1.0
    assert (meta.size, meta.fit, meta.content_box, meta.path) == (None, None, None, str(src))
    with pytest.raises(ValueError, match="load_array"):
        xio.to_original(np.zeros((16, 16)), meta)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.height = 1


# ---------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------


def test_dicom_polarity_mono1_matches_mono2(tmp_path):
    values = gradient(60, 40, 4095)  # bright (dense) at the bottom
    mono2 = write_dicom(tmp_path / "mono2.dcm", values, photometric="MONOCHROME2")
    mono1 = write_dicom(tmp_path / "mono1.dcm", 4095 - values, photometric="MONOCHROME1")
    a, meta2 = xio.load_image(mono2, 64)
    b, meta1 = xio.load_image(mono1, 64)
    assert meta2.photometric == "MONOCHROME2" and meta1.photometric == "MONOCHROME1"
    assert meta1.window_source == meta2.window_source == "percentile"
    assert (meta2.kind, meta2.bit_depth, meta2.mode) == ("dicom", 16, "uint16")
    np.testing.assert_allclose(a, b, atol=1e-5)
    top, left, h, w = meta2.content_box
    column = a[top:top + h, left + w // 2]
    assert column[-1] > column[0] and np.all(np.diff(column) >= -1e-6)  # bright bone stays at the bottom
    assert a.min() == -1.0 and a.max() == 1.0


def test_dicom_percentile_window_ignores_outliers(tmp_path):
    values = gradient(100, 100, 2000)
    values[0, 0] = 4095  # one hot pixel must not squash the contrast
    arr, meta = xio.load_array(write_dicom(tmp_path / "p.dcm", values))
    low, high = meta.window
    assert low == pytest.approx(np.percentile(values, 0.5)) and high == pytest.approx(np.percentile(values, 99.5))
    assert high < 2200
    assert arr[0, 0] == 1.0 and arr.max() == 1.0 and arr.min() == 0.0


def test_dicom_window_center_width(tmp_path):
    values = np.array([[0, 999, 1000, 1500, 2000, 2001, 4095]], np.uint16)
    arr, meta = xio.load_array(write_dicom(tmp_path / "w.dcm", values, WindowCenter=1500.5, WindowWidth=1001))
    assert meta.window_source == "dicom-window"
    assert meta.window == (1000.0, 2000.0)
    np.testing.assert_allclose(arr[0], [0, 0, 0, 0.5, 1, 1, 1], atol=1e-6)


def test_dicom_multi_valued_window_uses_first(tmp_path):
    values = np.array([[0, 1000, 1500, 2000, 4095]], np.uint16)
    src = write_dicom(tmp_path / "mw.dcm", values, WindowCenter=[1500.5, 300], WindowWidth=[1001, 50])
    arr, meta = xio.load_array(src)
    assert meta.window == (1000.0, 2000.0)
    np.testing.assert_allclose(arr[0], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_dicom_rescale_then_window(tmp_path):
    stored = np.array([[0, 500, 1000, 1500, 2000]], np.uint16)
    # Modality LUT: 2 * stored - 1000 -> [-1000, 0, 1000, 2000, 3000]; the window is in rescaled units.
    src = write_dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                      WindowCenter=1000.5, WindowWidth=2001, VOILUTFunction="LINEAR")
    arr, meta = xio.load_array(src)
    assert meta.window == (0.0, 2000.0)
    np.testing.assert_allclose(arr[0], [0, 0, 0.5, 1, 1], atol=1e-6)

    # MONOCHROME1 with the same tags: the window applies to the same rescaled values, then the display inverts.
    arr1, _ = xio.load_array(write_dicom(tmp_path / "r1.dcm", stored, photometric="MONOCHROME1",
                                         RescaleSlope=2, RescaleIntercept=-1000,
                                         WindowCenter=1000.5, WindowWidth=2001))
    np.testing.assert_allclose(arr1, 1.0 - arr, atol=1e-6)


def test_dicom_rescale_without_window(tmp_path):
    stored = gradient(30, 30, 4095)
    a, _ = xio.load_array(write_dicom(tmp_path / "a.dcm", stored))
    b, meta = xio.load_array(write_dicom(tmp_path / "b.dcm", stored, RescaleSlope=0.5, RescaleIntercept=-1024))
    assert meta.window[0] < 0  # the percentile window is taken after the rescale
    np.testing.assert_allclose(a, b, atol=1e-5)  # a linear rescale does not change a percentile window


def test_dicom_voi_lut_sequence(tmp_path):
    stored = np.array([[0, 1024, 2048, 4095]], np.uint16)
    ds = dicom_dataset(stored)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "US", [min(4095, 2 * i) for i in range(4096)])  # LUTData: doubles, saturates
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    arr, meta = xio.load_array(tmp_path / "lut.dcm")
    assert meta.window_source == "dicom-voi-lut" and meta.window is None
    np.testing.assert_allclose(arr[0], [0, 2048 / 4095, 1, 1], atol=1e-6)


def test_dicom_linear_exact_and_sigmoid(tmp_path):
    values = np.array([[0, 1000, 1500, 2000, 4095]], np.uint16)
    exact, meta = xio.load_array(write_dicom(tmp_path / "e.dcm", values, WindowCenter=1500, WindowWidth=1000,
                                             VOILUTFunction="LINEAR_EXACT"))
    assert meta.window == (1000.0, 2000.0)
    np.testing.assert_allclose(exact[0], [0, 0, 0.5, 1, 1], atol=1e-6)
    sigmoid, _ = xio.load_array(write_dicom(tmp_path / "s.dcm", values, WindowCenter=1500, WindowWidth=1000,
                                            VOILUTFunction="SIGMOID"))
    expected = 1 / (1 + np.exp(-4 * (values[0] - 1500.0) / 1000))
    np.testing.assert_allclose(sigmoid[0], expected, atol=1e-6)


def test_dicom_invalid_window_falls_back_to_percentile_with_warning(tmp_path):
    values = gradient(20, 20, 4095)
    src = write_dicom(tmp_path / "w0.dcm", values, WindowCenter=2000, WindowWidth=0)
    with pytest.warns(UserWarning, match="percentile"):
        arr, meta = xio.load_array(src)
    assert meta.window_source == "percentile"
    assert arr.min() == 0.0 and arr.max() == 1.0


def test_dicom_signed_pixels(tmp_path):
    values = np.array([[-1000, -500, 0, 500, 1000]], np.int16)
    ds = dicom_dataset(values.view(np.uint16), bits_stored=16, WindowCenter=0.5, WindowWidth=2001)
    ds.PixelRepresentation = 1
    ds.save_as(tmp_path / "signed.dcm", enforce_file_format=True)
    arr, meta = xio.load_array(tmp_path / "signed.dcm")
    assert meta.mode == "int16"
    np.testing.assert_allclose(arr[0], [0, 0.25, 0.5, 0.75, 1], atol=1e-6)


@pytest.mark.parametrize("bits_stored", [12, 14, 16])
def test_dicom_bits_stored(tmp_path, bits_stored):
    top = 2**bits_stored - 1
    stored = np.array([[0, top // 2, top]], np.uint16)
    src = write_dicom(tmp_path / "b.dcm", stored, bits_stored=bits_stored, WindowCenter=(top + 1) / 2,
                      WindowWidth=top + 1)
    arr, meta = xio.load_array(src)
    assert meta.bit_depth == 16
    assert arr[0, 0] == 0.0 and arr[0, 2] == 1.0 and arr[0, 1] == pytest.approx(0.5, abs=1e-3)


def test_dicom_round_trip_to_16bit_png(tmp_path):
    values = gradient(96, 80, 4095)
    src = write_dicom(tmp_path / "in.dcm", values, WindowCenter=2048, WindowWidth=4096)
    image, meta = xio.load_image(src, 64)
    assert meta.content_box == (0, 5, 64, 53)
    out = xio.save_like(xio.to_original(image, meta), meta, tmp_path / "out.png")
    assert_png(out, 96, 80, 16)
    back = np.asarray(Image.open(out)).astype(np.float64) / 65535
    expected, _ = xio.load_array(src)  # displayed values at the original size
    assert np.abs(back - expected).max() < 0.02


def test_dicom_8bit_saves_8bit_png(tmp_path):
    values = gradient(20, 30, 255, np.uint8)
    src = write_dicom(tmp_path / "in.dcm", values, bits_stored=8, bits_allocated=8)
    image, meta = xio.load_image(src, 30)
    assert meta.bit_depth == 8 and meta.mode == "uint8"
    out = xio.save_like(image, meta, tmp_path / "out.png")
    assert_png(out, 20, 30, 8)


def test_dicom_without_preamble_named_dcm(tmp_path):
    values = gradient(12, 10, 4095)
    plain = Dataset()
    for element in dicom_dataset(values):
        plain.add(element)
    plain.save_as(tmp_path / "raw.dcm", implicit_vr=False, little_endian=True)
    assert tmp_path.joinpath("raw.dcm").read_bytes()[128:132] != b"DICM"
    arr, meta = xio.load_array(tmp_path / "raw.dcm")
    assert meta.kind == "dicom" and arr.shape == (12, 10)

    renamed = tmp_path / "raw.bin"
    renamed.write_bytes((tmp_path / "raw.dcm").read_bytes())
    with pytest.raises(DataError, match="unrecognised"):
        xio.load_array(renamed)


# ---------------------------------------------------------------------------------------------------------
# Errors: every bad input raises DataError naming the file
# ---------------------------------------------------------------------------------------------------------


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(gradient(32, 32, 255, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _gif(path):
    Image.fromarray(gradient(8, 8, 255, np.uint8)).save(path, format="GIF")


def _dicom_bytes(**kw):
    buf = io.BytesIO()
    dicom_dataset(gradient(16, 16, 4095), **kw).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _no_pixel_data(path):
    ds = dicom_dataset(gradient(4, 4, 4095))
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


def _compressed(path, syntax, frame):
    ds = dicom_dataset(gradient(8, 8, 255, np.uint8), bits_stored=8, bits_allocated=8, syntax=syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def _rgb_dicom(path):
    ds = dicom_dataset(np.zeros((4, 4, 3), np.uint8), photometric="RGB", bits_stored=8, bits_allocated=8)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.save_as(path, enforce_file_format=True)


def _palette_dicom(path):
    ds = dicom_dataset(np.zeros((4, 4), np.uint8), photometric="PALETTE COLOR", bits_stored=8, bits_allocated=8)
    ds.save_as(path, enforce_file_format=True)


def _multiframe_dicom(path):
    ds = dicom_dataset(np.zeros((8, 4), np.uint16))
    ds.Rows = 4
    ds.NumberOfFrames = 2
    ds.save_as(path, enforce_file_format=True)


ERROR_CASES = {
    "missing": ("missing.png", None, "no such file"),
    "empty": ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
    "directory": ("folder.png", lambda p: p.mkdir(), "directory"),
    "text": ("notes.txt", lambda p: p.write_text("not an image\n"), "unrecognised"),
    "text named png": ("notes.png", lambda p: p.write_text("not an image\n"), "unrecognised"),
    "gif": ("anim.gif", _gif, "unsupported image format GIF"),
    "truncated png": ("cut.png", lambda p: p.write_bytes(_png_bytes()[:-20]), "cannot decode PNG"),
    "corrupt png": ("bad.png", lambda p: p.write_bytes(_png_bytes()[:60] + b"\x00" * 40 + _png_bytes()[100:]),
                    "cannot decode PNG"),
    "png magic only": ("magic.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), "cannot decode PNG"),
    "truncated jpeg": ("cut.jpg", lambda p: p.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2]),
                       "cannot decode JPEG"),
    "corrupt jpeg": ("bad.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff" + b"garbage" * 20), "cannot decode JPEG"),
    "truncated dicom": ("cut.dcm", lambda p: p.write_bytes(_dicom_bytes()[:-100]), "DICOM"),
    "dicom header only": ("head.dcm", lambda p: p.write_bytes(_dicom_bytes()[:200]), "DICOM"),
    "dicom without pixel data": ("nopix.dcm", _no_pixel_data, "no pixel data"),
    "dicom rgb": ("rgb.dcm", _rgb_dicom, "PhotometricInterpretation 'RGB'"),
    "dicom palette": ("pal.dcm", _palette_dicom, "PhotometricInterpretation 'PALETTE COLOR'"),
    "dicom multi-frame": ("multi.dcm", _multiframe_dicom, "multi-frame"),
    "dicom jpeg-ls no decoder": ("jls.dcm", lambda p: _compressed(p, JPEGLSLossless, b"\xff\xd8" + b"\0" * 30),
                                 "no decoder installed"),
    "dicom corrupt jpeg frame": ("badjpeg.dcm", lambda p: _compressed(p, JPEGBaseline8Bit, b"\xff\xd8" + b"x" * 30),
                                 "cannot decode DICOM pixel data"),
    "dicom bits allocated 32": ("b32.dcm", lambda p: p.write_bytes(_dicom_bytes(bits_allocated=32)),
                                "BitsAllocated"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_inputs_raise_data_error_with_path(tmp_path, case):
    name, make, problem = ERROR_CASES[case]
    path = tmp_path / name
    if make is not None:
        make(path)
    for load in (xio.load_array, lambda p: xio.load_image(p, 16)):
        with pytest.raises(DataError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ")
        assert "\n" not in message and "BytesIO" not in message
        assert problem in message


# ---------------------------------------------------------------------------------------------------------
# save_like guards
# ---------------------------------------------------------------------------------------------------------


def test_save_like_guards(tmp_path):
    arr = gradient(16, 16, 255, np.uint8)
    src = write_png(tmp_path / "src.png", arr)
    image, meta = xio.load_image(src, 16)

    with pytest.raises(DataError, match="source image") as info:
        xio.save_like(image, meta, src, overwrite=True)
    assert str(src) in str(info.value)
    np.testing.assert_array_equal(np.asarray(Image.open(src)), arr)  # untouched

    out = xio.save_like(-image, meta, tmp_path / "sub" / "out.png")  # creates the folder
    with pytest.raises(DataError, match="exists"):
        xio.save_like(image, meta, out)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), 255 - arr)  # the refused write changed nothing
    xio.save_like(image, meta, out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), arr)
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temporary files left behind

    with pytest.raises(DataError, match=r"\.png"):
        xio.save_like(image, meta, tmp_path / "out.jpg")
    with pytest.raises(ValueError, match="shape"):
        xio.save_like(np.zeros((10, 10)), meta, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        xio.save_like(np.full((16, 16), np.nan), meta, tmp_path / "x.png")
    with pytest.raises(ValueError, match="bit_depth"):
        xio.save_like(image, meta, tmp_path / "x.png", bit_depth=12)

    wide = xio.save_like(image, meta, tmp_path / "x16.png", bit_depth=16)
    assert_png(wide, 16, 16, 16)
    np.testing.assert_array_equal(np.asarray(Image.open(wide)), arr.astype(np.uint16) * 257)


def test_save_like_clips_out_of_range(tmp_path):
    src = write_png(tmp_path / "src.png", np.zeros((4, 4), np.uint8))
    image, meta = xio.load_image(src, 4)
    out = xio.save_like(np.array([[-3.0, -1.0, 0.0, 1.0]] * 4), meta, tmp_path / "out.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out))[0], [0, 0, 128, 255])
