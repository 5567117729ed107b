"""x2x_jax.editing.fullres: the resampling matrices against Pillow, the mask as the bilinear contour of G (against
an independent scipy interpolation, exact despite the windowing), the feather ramp, and the composite in stored
values (bit for bit outside the mask for 8/16-bit grey, RGB, RGBA and signed DICOM; keep-detail)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from x2x_jax.data import io as xio
from x2x_jax.editing import fullres

SIZE, N = 128, 16  # the model canvas and G's (latent) resolution: one latent cell = 8 canvas pixels
H, W = 157, 203  # the input; its content box (14, 0, 99, 128) is neither square nor a multiple of 8
BOX = xio.content_box(H, W, SIZE)
TAU = 0.5
BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def pillow(image, out_hw, box, resample):
    """Pillow's float32 resize of `image`'s region box = (x0, y0, x1, y1) to out_hw, as float64."""
    im = Image.fromarray(np.asarray(image, np.float32), mode="F")
    return np.asarray(im.resize(out_hw[::-1], resample, box=box), np.float64)


def ours(image, out_hw, box, kernel):
    x0, y0, x1, y1 = box
    ay = fullres.resample_matrix(image.shape[0], y0, y1 - y0, out_hw[0], kernel).astype(np.float64)
    ax = fullres.resample_matrix(image.shape[1], x0, x1 - x0, out_hw[1], kernel).astype(np.float64)
    return ay @ np.asarray(image, np.float64) @ ax.T


def interior(n_in, start, length, n_out, support):
    """Outputs whose kernel taps all lie inside the n_in input samples (where edge handling plays no part)."""
    scale = length / n_out
    reach = support * max(scale, 1.0)
    centres = start + (np.arange(n_out) + 0.5) * scale
    return (centres - reach >= 0) & (centres + reach <= n_in)


def latent_coords(n_out, start, length):
    """Input pixel i -> canvas start + (i + 0.5) * length / n_out -> G's sample coordinate (cell centres at k)."""
    canvas = start + (np.arange(n_out) + 0.5) * length / n_out
    return canvas * N / SIZE - 0.5


def smooth_field(seed, shape=(N, N), sigma=1.5):
    """A smooth random map rescaled to [0, 1]."""
    g = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma, mode="wrap")
    return ((g - g.min()) / (g.max() - g.min())).astype(np.float32)


def reference_guidance(g, box, height, width):
    """G at the input's pixels by scipy's bilinear interpolation (independent of fullres)."""
    top, left, h, w = box
    yy, xx = np.meshgrid(latent_coords(height, top, h), latent_coords(width, left, w), indexing="ij")
    return ndimage.map_coordinates(np.asarray(g, np.float64), [yy, xx], order=1, mode="nearest")


def texture(height, width, seed):
    """Display grey in [0, 1]: a smooth gradient plus pixel-level noise (detail the model cannot see)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    return np.clip(0.15 + 0.6 * y / height + 0.1 * x / width + 0.05 * rng.standard_normal((height, width)), 0, 1)


def write_signed_dicom(path, stored):
    """int16 stored values, 16 bits stored, rescale 0.5 / +100, LINEAR window over modality [-400, 1100]."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, 100
    ds.WindowCenter, ds.WindowWidth = 350.5, 1501
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


KINDS = ("L8", "I16", "LA", "RGB", "RGBA", "DICOM")


def make_source(tmp_path, kind, grey):
    """Write `grey` (display [0, 1]) as a file of `kind` and read it back with load_source."""
    if kind == "DICOM":  # display = (0.5 s + 100 - 350) / 1500 + 0.5  <=>  s = 3000 * grey - 1000
        return xio.load_source(write_signed_dicom(tmp_path / "in.dcm", np.rint(3000 * grey - 1000).astype(np.int16)))
    path = tmp_path / "in.png"
    if kind == "I16":
        pixels = np.rint(grey * 65535).astype(np.uint16)
    else:
        pixels = np.rint(grey * 255).astype(np.uint8)
        rng = np.random.default_rng(7)
        if kind in ("RGB", "RGBA"):  # colour that differs between channels
            pixels = np.clip(pixels[..., None].astype(int) + rng.integers(-20, 21, (3,)), 0, 255).astype(np.uint8)
        if kind in ("LA", "RGBA"):  # an alpha channel varying over the image
            alpha = rng.integers(0, 256, pixels.shape[:2], dtype=np.uint8)
            pixels = np.concatenate([np.atleast_3d(pixels), alpha[..., None]], axis=2)
    Image.fromarray(pixels).save(path, format="PNG")
    return xio.load_source(path)


def run(source, decoded, guidance, tau=TAU, *, feather=3, keep_detail=False, model_input=None, box=BOX):
    if model_input is None:
        model_input = xio.resize_to_model(source.grey, SIZE) * 2.0 - 1.0
    return fullres.composite(source, decoded, model_input, guidance, tau, size=SIZE, box=box, feather=feather,
                             keep_detail=keep_detail)


def grey_levels(source, pixels, where):
    """Stored levels at `where` as float64 (k, 1), or (k, 3) for RGB(A): R, G and B, which a grey edit sets alike."""
    got = pixels[where].astype(np.float64)
    return got[:, :source.grey_channels] if source.grey_channels else got[:, None]


def decoded_edit(seed=11):
    """A smooth decoded edit over the canvas, [-1, 1]."""
    return smooth_field(seed, (SIZE, SIZE), sigma=6) * 1.6 - 0.8


# ---------------------------------------------------------------------------------------------------------
# resample_matrix
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in, start, length, n_out", [
    (16, 0, 16, 57), (16, 1.75, 12.375, 157), (128, 14, 99, 157), (40, 0, 40, 9), (40, 3.5, 30, 11)])
def test_resample_matrix_rows_sum_to_one(kernel, n_in, start, length, n_out):
    a = fullres.resample_matrix(n_in, start, length, n_out, kernel)
    assert a.shape == (n_out, n_in) and a.dtype == np.float32
    np.testing.assert_allclose(a.astype(np.float64).sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
def test_resample_matrix_identity_when_sizes_match(kernel):
    np.testing.assert_array_equal(fullres.resample_matrix(23, 0, 23, 23, kernel), np.eye(23, dtype=np.float32))


@pytest.mark.parametrize("box, out_hw", [
    ((0, 0, 24, 20), (57, 63)),          # whole image, upscaled
    ((3, 2.5, 21, 17), (57, 63)),        # a fractional sub-box
    ((3, 2.5, 21, 17), (20, 24)),        # a sub-box to about its own size (slight upscale)
    ((0, 1.25, 24, 18.5), (157, 203)),   # G-like: the content box of the canvas to an input
])
def test_bilinear_upsampling_equals_pillow_including_edges(box, out_hw):
    # Upsampling: repeating the edge sample (ours) and renormalising over the taps inside (Pillow) agree for the
    # triangle kernel, whose only tap beyond the edge pairs with the edge sample itself.
    img = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    np.testing.assert_allclose(ours(img, out_hw, box, "bilinear"), pillow(img, out_hw, box, BILINEAR), atol=2e-7)


@pytest.mark.parametrize("box, out_hw", [((0, 0, 24, 20), (57, 63)), ((3, 2.5, 21, 17), (57, 63)),
                                         ((0, 1.25, 24, 18.5), (157, 203))])
def test_bicubic_upsampling_equals_pillow_in_the_interior(box, out_hw):
    img = np.random.default_rng(1).random((20, 24)).astype(np.float32)
    a, b = ours(img, out_hw, box, "bicubic"), pillow(img, out_hw, box, BICUBIC)
    x0, y0, x1, y1 = box
    rows = interior(20, y0, y1 - y0, out_hw[0], 2.0)
    cols = interior(24, x0, x1 - x0, out_hw[1], 2.0)
    assert rows.sum() > out_hw[0] // 2 and cols.sum() > out_hw[1] // 2
    np.testing.assert_allclose(a[np.ix_(rows, cols)], b[np.ix_(rows, cols)], atol=2e-7)
    # At the edges the two differ by design: we repeat the edge sample beyond the image, Pillow drops the taps
    # outside and renormalises the rest (the cubic's negative lobes make that a different value).
    if box == (0, 0, 24, 20):
        assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("kernel, resample", [("bilinear", BILINEAR), ("bicubic", BICUBIC)])
@pytest.mark.parametrize("box, out_hw", [((0, 0, 96, 80), (13, 17)), ((5, 3.5, 90, 71), (20, 30))])
def test_shrinking_is_antialiased_like_pillow(kernel, resample, box, out_hw):
    rng = np.random.default_rng(2)
    img = rng.random((80, 96)).astype(np.float32)
    a, b = ours(img, out_hw, box, kernel), pillow(img, out_hw, box, resample)
    x0, y0, x1, y1 = box
    support = fullres.KERNELS[kernel][1]
    rows = interior(80, y0, y1 - y0, out_hw[0], support)
    cols = interior(96, x0, x1 - x0, out_hw[1], support)
    assert rows.sum() >= 3 and cols.sum() >= 3
    np.testing.assert_allclose(a[np.ix_(rows, cols)], b[np.ix_(rows, cols)], atol=2e-7)
    # Antialiased: the kernel is widened by the scale, so white noise is averaged down (a point-sampling
    # interpolation would keep its variance, ~1/12).
    assert a[np.ix_(rows, cols)].std() < 0.5 * img.std()
    taps = (fullres.resample_matrix(96, x0, x1 - x0, out_hw[1], kernel) != 0).sum(axis=1)
    assert taps[cols].min() >= 2 * support * (x1 - x0) / out_hw[1] - 2  # the kernel spans 2 * support * scale


# ---------------------------------------------------------------------------------------------------------
# The mask: the bilinear contour of G
# ---------------------------------------------------------------------------------------------------------

GEOMETRIES = [((H, W), BOX), ((W, H), xio.content_box(W, H, SIZE)), ((150, 170), (9, 5, 101, 115))]


@pytest.mark.parametrize("hw, box", GEOMETRIES)
def test_mask_is_the_bilinear_contour_of_g(tmp_path, hw, box):
    height, width = hw
    source = make_source(tmp_path, "L8", texture(height, width, 0))
    g = smooth_field(3)
    result = run(source, decoded_edit(), g, box=box)
    reference = reference_guidance(g, box, height, width)
    ties = np.abs(reference - TAU) < 1e-5
    assert ties.mean() < 1e-3
    assert 0.1 < result.mask.mean() < 0.9
    np.testing.assert_array_equal(result.mask[~ties], (reference >= TAU)[~ties])

    # Not the latent grid's blocks: nearest-cell upsampling of (G >= tau) changes value only at the ~N cell
    # boundaries of each axis; the bilinear contour crosses rows and columns at many more positions.
    cell_cols = np.rint(latent_coords(width, box[1], box[3]))
    cell_rows = np.rint(latent_coords(height, box[0], box[2]))
    col_changes = np.flatnonzero(np.diff(result.mask.astype(np.int8), axis=1).any(axis=0)) + 1
    row_changes = np.flatnonzero(np.diff(result.mask.astype(np.int8), axis=0).any(axis=1)) + 1
    off_col = col_changes[cell_cols[col_changes] == cell_cols[col_changes - 1]]  # inside one cell's columns
    off_row = row_changes[cell_rows[row_changes] == cell_rows[row_changes - 1]]
    assert off_col.size > N and off_row.size > N
    blocky = (g >= TAU)[np.clip(cell_rows, 0, N - 1).astype(int)][:, np.clip(cell_cols, 0, N - 1).astype(int)]
    assert (blocky != result.mask).mean() > 0.01


@pytest.mark.parametrize("case", ["smooth", "binary", "one-cell", "plateau", "corner", "edges", "row"])
@pytest.mark.parametrize("hw, box", GEOMETRIES[::2])
def test_windowed_mask_equals_full_image_threshold(tmp_path, hw, box, case):
    """composite resamples G only near cells >= tau; the mask must be the same as thresholding G everywhere."""
    height, width = hw
    g = smooth_field(5) * 0.9
    if case == "binary":  # exact ties at tau between cells: the same float path must decide them
        g = (smooth_field(5) > 0.5).astype(np.float32)
    elif case == "one-cell":
        g[:] = 0.0
        g[7, 9] = 1.0
    elif case in ("corner", "edges"):  # G high at the content's corners / first column and last row
        ys, xs = latent_coords(height, box[0], box[2]), latent_coords(width, box[1], box[3])
        r0, c0 = max(int(np.floor(ys[0])), 0), max(int(np.floor(xs[0])), 0)  # the cells around the first pixel
        r1, c1 = min(int(np.ceil(ys[-1])), N - 1), min(int(np.ceil(xs[-1])), N - 1)  # ... and the last one
        g[:] = 0.2
        if case == "corner":
            g[r0:r0 + 2, c0:c0 + 2] = g[r1 - 1:r1 + 1, c1 - 1:c1 + 1] = 0.8
        else:
            g[:, c0:c0 + 2] = g[r1 - 1:r1 + 1, :] = 0.55
    elif case == "plateau":  # one high cell on a plateau just below tau: the mask reaches ~1 cell around it
        g[:] = TAU - 0.02
        g[7, 9] = 1.0
    elif case == "row":  # a sliver just above tau: the window must not clip its bilinear tails
        g[:] = 0.0
        g[6, 3:12] = TAU + 0.1
    source = make_source(tmp_path, "L8", texture(height, width, 1))
    result = run(source, decoded_edit(), g, box=box)
    full = fullres.guidance_to_original(g, SIZE, box, height, width)
    assert full.shape == (height, width) and full.dtype == np.float32
    np.testing.assert_array_equal(result.mask, full >= np.float32(TAU))
    assert result.mask.any()


# ---------------------------------------------------------------------------------------------------------
# Feather
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 3, 6])
@pytest.mark.parametrize("transpose", [False, True])
def test_feather_ramp_across_a_straight_edge(r, transpose):
    mask = np.zeros((60, 90), bool)
    mask[:, 40:] = True  # the mask runs to the image's right edge
    if transpose:
        mask = mask.T
    alpha = fullres.feather_alpha(mask, r)
    if transpose:
        alpha = alpha.T
    assert alpha.dtype == np.float32
    # At depth d inside (d = 0: the first mask column) the (2r+1)-box holds r + d + 1 mask columns, so
    # alpha = 2 (r + d + 1) / (2r + 1) - 1 = (2d + 1) / (2r + 1): a linear ramp reaching 1 at depth r.
    depth = np.arange(r + 3)
    expected = np.minimum((2 * depth + 1) / (2 * r + 1), 1.0)
    np.testing.assert_allclose(alpha[:, 40 + depth], np.broadcast_to(expected, (60, r + 3)), atol=1e-6)
    assert np.all(alpha[:, :40] == 0.0) and np.all(alpha[:, 40 + r:] == 1.0)  # 1 up to the image edge too


def test_feather_properties_on_a_blob():
    y, x = np.mgrid[0:120, 0:150]
    mask = ((y - 60) ** 2 / 40**2 + (x - 70) ** 2 / 55**2 <= 1) | ((y < 10) & (x > 140))  # disc + corner sliver
    for r in (2, 5, 9):
        alpha = fullres.feather_alpha(mask, r)
        assert alpha.shape == mask.shape and alpha.dtype == np.float32
        assert np.all(alpha[~mask] == 0.0)
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0
        assert alpha[60, 70] == 1.0 and np.all(alpha[55:66, 60:81] == 1.0)  # deep inside
        edge = mask & ~ndimage.binary_erosion(mask, border_value=1)  # its boundary (not the image's): < 1
        assert alpha[edge].max() < 1.0
    np.testing.assert_array_equal(fullres.feather_alpha(mask, 0), mask.astype(np.float32))


@pytest.mark.parametrize("hw, content, expected", [
    ((3000, 2500), (512, 427), 25),   # 1 % of 2500 = 25 > one model pixel (5.86)
    ((157, 203), (99, 128), 2),       # one model pixel (1.59) > 1 % (1.57) -> 2
    ((4000, 4000), (128, 128), 40),   # 1 % = 40 > 31.25
    ((4000, 4000), (60, 60), 67),     # one model pixel = 66.7 > 40
    ((300, 600), (64, 64), 9),        # stretch: the coarser axis' model pixel (600 / 64 = 9.4)
    ((40, 40), (512, 512), 0),        # upscaled input: 1 % = 0.4, one model pixel = 0.08 -> 0
])
def test_default_feather(hw, content, expected):
    assert fullres.default_feather(*hw, content) == expected


# ---------------------------------------------------------------------------------------------------------
# The composite
# ---------------------------------------------------------------------------------------------------------


def pillow_edit(decoded, box, height, width):
    """The decoded edit's content box, bicubic by Pillow, as display grey in [0, 1]."""
    top, left, h, w = box
    up = pillow(decoded, (height, width), (left, top, left + w, top + h), BICUBIC)
    return np.clip((up + 1.0) * 0.5, 0.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_composite_outside_mask_is_the_input_and_inside_is_the_edit(tmp_path, kind):
    source = make_source(tmp_path, kind, texture(H, W, 2))
    before = source.pixels.copy()
    decoded = decoded_edit()
    result = run(source, decoded, smooth_field(3), feather=4)
    np.testing.assert_array_equal(source.pixels, before)  # the source is not modified
    out = result.pixels
    assert out.dtype == before.dtype and out.shape == before.shape
    assert 0.1 < result.mask.mean() < 0.9 and result.feather == 4 and result.keep_detail is False
    np.testing.assert_array_equal(out[~result.mask], before[~result.mask])
    assert np.all(result.alpha[~result.mask] == 0.0)
    np.testing.assert_allclose(result.alpha, fullres.feather_alpha(result.mask, 4), atol=1e-6)
    if kind in ("LA", "RGBA"):
        np.testing.assert_array_equal(out[..., -1], before[..., -1])

    # Where alpha == 1 the output is the bicubic edit mapped to stored values (Pillow as the reference, in the
    # interior where its edge renormalisation plays no part).
    top, left, h, w = BOX
    full = (result.alpha == 1.0) & np.outer(interior(SIZE, top, h, H, 2.0), interior(SIZE, left, w, W, 2.0))
    assert full.sum() > 1000
    expected = np.rint(source.to_stored(pillow_edit(decoded, BOX, H, W)))[full]
    assert np.abs(grey_levels(source, out, full) - expected[:, None]).max() <= 1  # colour: into R, G and B
    # ... and it is an edit: it changed the image there.
    assert np.abs(out[full].astype(np.float64) - before[full].astype(np.float64)).mean() > 5


@pytest.mark.parametrize("kind", ["L8", "RGBA", "DICOM"])
def test_tau_zero_masks_everything_and_g_below_tau_changes_nothing(tmp_path, kind):
    source = make_source(tmp_path, kind, texture(H, W, 3))
    g = smooth_field(4)
    everything = run(source, decoded_edit(), g, tau=0.0, feather=3)
    assert everything.mask.all()
    assert everything.alpha.min() == 1.0  # the mask reaches the image edges: nothing to feather
    nothing = run(source, decoded_edit(), g * 0.4, tau=0.41, feather=3)
    assert not nothing.mask.any() and not nothing.alpha.any()
    np.testing.assert_array_equal(nothing.pixels, source.pixels)
    assert nothing.pixels is not source.pixels


def test_composite_rejects_negative_feather(tmp_path):
    source = make_source(tmp_path, "L8", texture(H, W, 4))
    with pytest.raises(ValueError, match="feather"):
        run(source, decoded_edit(), smooth_field(3), feather=-1)


def detailed(height, width):
    """Mid-grey (display 0.25 .. 0.55) with a diagonal pixel checkerboard of +-0.04: detail the model's canvas
    (1.6x smaller) cannot hold."""
    y, x = np.mgrid[0:height, 0:width]
    return 0.3 + 0.2 * y / height + 0.04 * (((x + y) % 2) * 2 - 1)


@pytest.mark.parametrize("kind", ["L8", "I16", "LA", "RGBA", "DICOM"])
def test_keep_detail_where_the_edit_changed_nothing(tmp_path, kind):
    source = make_source(tmp_path, kind, detailed(H, W))
    model_input = xio.resize_to_model(source.grey, SIZE) * 2.0 - 1.0
    g = smooth_field(3)
    keep = run(source, model_input, g, model_input=model_input, keep_detail=True)
    blur = run(source, model_input, g, model_input=model_input, keep_detail=False)
    np.testing.assert_array_equal(keep.mask, blur.mask)
    inside = keep.mask
    # Inside the mask the input comes back within one level (the float32 path is far below a level from it): its
    # own stored levels (grey) or its luminance, in R, G and B where alpha == 1 (colour).
    own, where = source.pixels, inside
    if source.grey_channels:
        own, where = np.rint(source.to_stored(source.grey)), inside & (keep.alpha == 1)
        np.testing.assert_array_equal(keep.pixels[..., -1], source.pixels[..., -1])  # alpha
        assert np.abs(source.to_display(keep.pixels) - source.grey)[inside].max() <= 1 / 255 + 1e-6
    assert np.abs(grey_levels(source, keep.pixels, where) - own[where][:, None]).max() <= 1
    # Without keep-detail the mask holds the blurry upsampled model input: the checkerboard is gone.
    grey_blur = source.to_display(blur.pixels)
    assert np.abs(grey_blur - source.grey)[inside & (blur.alpha == 1)].mean() > 0.02
    stored_blur = np.rint(source.to_stored(pillow_edit(model_input, BOX, H, W)))
    top, left, h, w = BOX
    full = (blur.alpha == 1.0) & np.outer(interior(SIZE, top, h, H, 2.0), interior(SIZE, left, w, W, 2.0))
    assert np.abs(grey_levels(source, blur.pixels, full) - stored_blur[full][:, None]).max() <= 1


@pytest.mark.parametrize("kind", ["L8", "I16", "RGB", "DICOM"])
def test_keep_detail_fades_out_where_the_edit_changed_the_content(tmp_path, kind):
    source = make_source(tmp_path, kind, detailed(H, W))
    model_input = xio.resize_to_model(source.grey, SIZE) * 2.0 - 1.0
    change = 1.5 * fullres.DETAIL_CHANGE  # in display units; the canvas is [-1, 1], twice as wide
    decoded = model_input + 2.0 * change
    g = smooth_field(3)
    keep = run(source, decoded, g, model_input=model_input, keep_detail=True)
    plain = run(source, decoded, g, model_input=model_input, keep_detail=False)
    np.testing.assert_array_equal(keep.mask, plain.mask)
    assert keep.mask.mean() > 0.1
    np.testing.assert_array_equal(keep.pixels, plain.pixels)
    # ... and that is the change: the displayed grey went up by `change` where alpha == 1 (the edit's blur aside).
    full = keep.alpha == 1.0
    shift = source.to_display(keep.pixels)[full] - source.to_display(source.pixels)[full]
    assert abs(shift.mean() - change) < 0.01
