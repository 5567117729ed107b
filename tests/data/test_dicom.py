"""x2x_jax.data.dicom: the display mapping inverted (stored -> display -> stored is exact inside the window for every
VOI / Modality LUT kind, polarity and signedness; the window edges; the BitsStored clip; a non-monotone LUT refused)
and the derived DICOM (`write_derived`): geometry, photometry and identity tags, new UIDs, the reference to the
source, nothing else added, uncompressed output of a compressed source, failed writes."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from x2x_jax.data import io as xio
from x2x_jax.data.dicom import write_derived
from x2x_jax.errors import DataError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
LUT_DATA = 0x00283006  # US or OW: given as US here


def dataset(stored, *, photometric="MONOCHROME2", bits_stored=12, bits_allocated=16, signed=False, **tags):
    """A minimal DX dataset with identity tags, holding `stored` (2-D) uncompressed."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("src.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.ImageType = "X2X-TEST-7", "DX", ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for key, value in tags.items():
        setattr(ds, key, value)
    dtype = ("<i" if signed else "<u") + str(bits_allocated // 8)
    ds.PixelData = np.asarray(stored).astype(dtype).tobytes()
    return ds


def lut_item(first, data, bits=16, vr="US", **tags):
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item.add_new(LUT_DATA, vr, [int(v) for v in data] if vr == "US" else np.asarray(data, "<u2").tobytes())
    for key, value in tags.items():
        setattr(item, key, value)
    return item


def load(tmp_path, ds, name="src.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return xio.load_source(path)


# A strictly increasing, non-linear table over stored 500 .. 3499 (the VOI LUT) and over 0 .. 4095 (Modality LUT).
VOI_LUT = np.rint(65535 * (np.arange(3000) / 2999) ** 0.7).astype(int)
MODALITY_LUT = np.rint(8000 * (np.arange(4096) / 4095) ** 1.5 + 3 * np.arange(4096)).astype(int)
LO, HI = int(MODALITY_LUT[1000]), int(MODALITY_LUT[3000])

# name -> (dataset tags, stored values inside the window, (stored at displayed 0, stored at displayed 1) in
# MONOCHROME2). LINEAR: modality window [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2]; LINEAR_EXACT: c -+ w / 2.
CASES = {
    # modality = 2 s - 1000, window [0, 2000] -> stored [500, 1500]
    "linear-rescale": (dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000.5, WindowWidth=2001,
                            VOILUTFunction="LINEAR"), np.arange(500, 1501), (500, 1500)),
    "linear-exact": (dict(WindowCenter=2000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT"),
                     np.arange(1500, 2501), (1500, 2500)),
    # no hard edges: 0 / 1 are c -+ (w / 4) ln(1e6 - 1) = 2000 -+ 3454, clipped to the 12-bit range
    "sigmoid": (dict(WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"), np.arange(1000, 3001),
                (0, 4095)),
    "voi-lut": (dict(VOILUTSequence=[lut_item(500, VOI_LUT)]), np.arange(500, 3500), (500, 3499)),
    "modality-lut": (dict(ModalityLUTSequence=[lut_item(0, MODALITY_LUT, ModalityLUTType="US")],
                          WindowCenter=(LO + HI) / 2 + 0.5, WindowWidth=HI - LO + 1), np.arange(1000, 3001),
                     (1000, 3000)),
    # the percentile window of this image (its 0.5 / 99.5 % points) -> values strictly between them
    "percentile": (dict(), np.arange(300, 3801, 1), None),
}


def image_of(values, side=64):
    """A side x side image holding `values` (cycled), so the whole set is read through the file."""
    return np.resize(np.asarray(values), (side, side))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("case", list(CASES))
def test_to_stored_inverts_to_display(tmp_path, case, photometric):
    tags, values, edges = CASES[case]
    source = load(tmp_path, dataset(image_of(values), photometric=photometric, **tags))
    display = source.dicom
    if case == "percentile":
        assert display.window_source == "percentile"
        low, high = display.window
        values = values[(values > low) & (values < high)]
        edges = (low, high)
    np.testing.assert_array_equal(source.pixels, image_of(CASES[case][1]))
    grey = display.to_display(values)
    assert grey.min() >= 0.0 and grey.max() <= 1.0 and np.ptp(grey) > 0.5
    steps = np.diff(grey)  # dense is bright: MONOCHROME1 displays high stored values dark
    assert np.all(steps > 0) if photometric == "MONOCHROME2" else np.all(steps < 0)
    back = display.to_stored(grey)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(np.rint(back), values)
    assert np.abs(back - values).max() < 1e-3
    # Displayed 0 / 1 are the window's edges (MONOCHROME1: the other way round).
    ends = display.to_stored(np.array([0.0, 1.0]))
    expected = edges if photometric == "MONOCHROME2" else edges[::-1]
    np.testing.assert_allclose(ends, expected, atol=1e-6)
    # Source.to_stored is the same mapping (what fullres.composite writes back through).
    np.testing.assert_array_equal(source.to_stored(grey), back)


@pytest.mark.parametrize("case", ["voi-lut", "modality-lut"])
@pytest.mark.parametrize("encoding", ["explicit-OW", "implicit"])
def test_lut_data_as_ow_words(tmp_path, case, encoding):
    """LUT Data is US or OW; an Implicit VR file always reads it back as OW bytes. Both read as the US table does."""
    tags, values, edges = CASES[case]
    us = load(tmp_path, dataset(image_of(values), **tags), name="us.dcm")
    sequence = "VOILUTSequence" if case == "voi-lut" else "ModalityLUTSequence"
    item = tags[sequence][0]
    extra = {"ModalityLUTType": "US"} if case == "modality-lut" else {}
    ow = dataset(image_of(values), **{**tags, sequence: [lut_item(item.LUTDescriptor[1], item.LUTData, vr="OW",
                                                                  **extra)]})
    if encoding == "implicit":
        ow.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # no VR in the file: read back as OW
    source = load(tmp_path, ow, name="ow.dcm")
    assert pydicom.dcmread(tmp_path / "ow.dcm")[sequence][0]["LUTData"].VR == "OW"
    grey = source.dicom.to_display(values)
    np.testing.assert_array_equal(grey, us.dicom.to_display(values))
    np.testing.assert_array_equal(np.rint(source.dicom.to_stored(grey)), values)
    np.testing.assert_allclose(source.dicom.to_stored(np.array([0.0, 1.0])), edges, atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_signed_pixels_round_trip(tmp_path, photometric):
    values = np.arange(-1000, 1001)  # modality = stored - 24, window [-1024, 976] -> stored [-1000, 1000]
    source = load(tmp_path, dataset(image_of(values), photometric=photometric, bits_stored=12, signed=True,
                                    RescaleSlope=1, RescaleIntercept=-24, WindowCenter=-23.5, WindowWidth=2001))
    assert source.pixels.dtype == np.int16 and source.stored_range == (-2048, 2047)
    np.testing.assert_array_equal(source.pixels, image_of(values))
    grey = source.dicom.to_display(values)
    np.testing.assert_array_equal(np.rint(source.dicom.to_stored(grey)), values)
    ends = source.dicom.to_stored(np.array([0.0, 1.0]))
    np.testing.assert_allclose(ends, [-1000, 1000] if photometric == "MONOCHROME2" else [1000, -1000])


@pytest.mark.parametrize("bits_stored, signed, expected", [
    (10, False, (0, 1023)), (12, False, (0, 4095)), (16, False, (0, 65535)),
    (12, True, (-2048, 2047)), (16, True, (-32768, 32767)),
])
def test_to_stored_is_clipped_to_the_bits_stored_range(tmp_path, bits_stored, signed, expected):
    # A window far wider than the stored range (and a rescale that stretches it further): displayed 0 / 1 would
    # map outside what BitsStored / PixelRepresentation can hold.
    source = load(tmp_path, dataset(image_of(np.arange(0, 1000)), bits_stored=bits_stored, signed=signed,
                                    RescaleSlope=0.5, RescaleIntercept=10, WindowCenter=0, WindowWidth=10**6,
                                    VOILUTFunction="LINEAR_EXACT"))
    assert source.stored_range == expected
    ends = source.dicom.to_stored(np.array([0.0, 1.0, -3.0, 7.0]))
    np.testing.assert_array_equal(ends, [expected[0], expected[1], expected[0], expected[1]])
    inside = source.dicom.to_stored(source.dicom.to_display(np.arange(0, 1000)))
    np.testing.assert_array_equal(np.rint(inside), np.arange(0, 1000))


@pytest.mark.parametrize("tag", ["RescaleSlope", "RescaleIntercept"])
def test_a_lone_rescale_tag_is_ignored_both_ways(tmp_path, tag):
    """pydicom's apply_modality_lut rescales only when both tags are present; the inverse must do the same."""
    values = np.arange(1000, 3001)
    source = load(tmp_path, dataset(image_of(values), WindowCenter=2000.5, WindowWidth=2001, **{tag: 2}))
    grey = source.dicom.to_display(values)
    np.testing.assert_allclose(grey, (values - 1000) / 2000, atol=1e-12)  # no rescale on the way in
    np.testing.assert_array_equal(np.rint(source.dicom.to_stored(grey)), values)  # ... nor on the way back


@pytest.mark.parametrize("sequence, what", [("VOILUTSequence", "VOI LUT"), ("ModalityLUTSequence", "Modality LUT")])
def test_non_monotone_lut_is_refused_naming_the_file(tmp_path, sequence, what):
    up_down = np.concatenate([np.arange(0, 4096, 2), np.arange(4095, -1, -2)])  # rises, then falls
    tags = {sequence: [lut_item(0, up_down)]}
    if sequence == "ModalityLUTSequence":
        tags["ModalityLUTSequence"][0].ModalityLUTType = "US"
    source = load(tmp_path, dataset(image_of(np.arange(0, 4096, 7)), **tags), name="bad-lut.dcm")
    grey = source.dicom.to_display(np.array([10, 20]))  # forward still works
    with pytest.raises(DataError, match=rf"bad-lut\.dcm: the {what} is not monotone"):
        source.dicom.to_stored(grey)


# ---------------------------------------------------------------------------------------------------------
# write_derived
# ---------------------------------------------------------------------------------------------------------

SOURCES = {
    "mono1-12bit": dict(photometric="MONOCHROME1", RescaleSlope=1.5, RescaleIntercept=-20, WindowCenter=2000,
                        WindowWidth=3000),
    "signed": dict(signed=True, bits_stored=16, WindowCenter=[0, 40], WindowWidth=[4000, 400]),
    "8bit-odd": dict(bits_stored=8, bits_allocated=8, shape=(33, 35)),  # an odd number of pixel bytes
    "rle": dict(compress=True, RescaleSlope=1, RescaleIntercept=0, WindowCenter=2048, WindowWidth=4096),
}
ADDED = {"DerivationDescription", "SourceImageSequence"}
CHANGED = {"SOPInstanceUID", "SeriesInstanceUID", "ImageType", "PixelData"}


def derived_source(tmp_path, name):
    tags = dict(SOURCES[name])
    shape, compress = tags.pop("shape", (48, 40)), tags.pop("compress", False)
    rng = np.random.default_rng(len(name))
    bits, signed = tags.get("bits_stored", 12), tags.get("signed", False)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ds = dataset(rng.integers(low, high + 1, shape), **tags)
    if compress:
        ds.compress(RLELossless)
    path = tmp_path / "src.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, xio.load_source(path)


@pytest.mark.parametrize("name", list(SOURCES))
def test_write_derived(tmp_path, name):
    src_path, source = derived_source(tmp_path, name)
    before = pydicom.dcmread(src_path)
    if name == "rle":
        assert before.file_meta.TransferSyntaxUID == RLELossless
    pixels = source.pixels.copy()
    low, high = source.stored_range
    pixels[5:20, 7:30] = np.clip(pixels[5:20, 7:30].astype(np.int64) // 2 + 3, low, high)  # "the edit"
    out = write_derived(source.dicom.ds, pixels, tmp_path / "edited.dcm",
                        instruction="add a small left pleural effusion", model="tiny-ip2p@step100")
    assert out == tmp_path / "edited.dcm"
    after = pydicom.dcmread(out)

    assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not after["PixelData"].is_undefined_length  # not encapsulated
    assert len(after.PixelData) in (pixels.size * pixels.itemsize, pixels.size * pixels.itemsize + 1)
    assert after.pixel_array.dtype == source.pixels.dtype
    np.testing.assert_array_equal(after.pixel_array, pixels)
    for tag in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                "StudyInstanceUID", "PatientID", "SOPClassUID"):
        assert after.get(tag) == before.get(tag), tag
    # New identity, with the file meta in step; the source referenced.
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPClassUID == before.SOPClassUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert len({after.SOPInstanceUID, after.SeriesInstanceUID, after.StudyInstanceUID}) == 3
    assert list(after.ImageType) == ["DERIVED", "SECONDARY"]
    assert "add a small left pleural effusion" in after.DerivationDescription
    assert "tiny-ip2p@step100" in after.DerivationDescription
    (ref,) = after.SourceImageSequence
    assert ref.ReferencedSOPClassUID == before.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == before.SOPInstanceUID
    # Nothing else added, nothing dropped, every other element as it was.
    names = {e.keyword for e in after}
    assert names - {e.keyword for e in before} == ADDED
    assert {e.keyword for e in before} - names == set()
    for element in before:
        if element.keyword not in CHANGED:
            assert after[element.tag].value == element.value, element.keyword
    # The source dataset is not modified, and the derived file reads back as an editable input.
    assert source.dicom.ds.SOPInstanceUID == before.SOPInstanceUID
    again = xio.load_source(out)
    np.testing.assert_array_equal(again.pixels, pixels)
    assert again.dicom.window_source == source.dicom.window_source


def test_write_derived_twice_gives_distinct_uids_and_truncates_long_text(tmp_path):
    _, source = derived_source(tmp_path, "mono1-12bit")
    a = pydicom.dcmread(write_derived(source.dicom.ds, source.pixels, tmp_path / "a.dcm", instruction="x",
                                      model="m"))
    b = pydicom.dcmread(write_derived(source.dicom.ds, source.pixels, tmp_path / "b.dcm", instruction="y" * 5000,
                                      model="m"))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert len(b.DerivationDescription) == 1024 and b.DerivationDescription.endswith("...")  # ST: <= 1024 chars
    with pytest.raises(ValueError, match="shape"):
        write_derived(source.dicom.ds, source.pixels[:-1], tmp_path / "c.dcm", instruction="x", model="m")


@pytest.mark.parametrize("where", ["missing-folder", "onto-a-directory"])
def test_write_derived_failure_raises_data_error_and_leaves_no_temp_file(tmp_path, where):
    _, source = derived_source(tmp_path, "mono1-12bit")
    target = tmp_path / "missing" / "edited.dcm"
    if where == "onto-a-directory":  # the temporary file is written, then the rename fails
        target = tmp_path / "edited.dcm"
        target.mkdir()
    with pytest.raises(DataError, match=r"edited\.dcm: cannot write DICOM"):
        write_derived(source.dicom.ds, source.pixels, target, instruction="x", model="m")
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == (["edited.dcm", "src.dcm"] if where == "onto-a-directory" else ["src.dcm"])
