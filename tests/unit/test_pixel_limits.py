"""Pixel-decode bombs: declared sizes checked before decoding, large images in bounded memory.

Decoders size their output from the header (Rows, Columns, Number of Frames, Samples per Pixel,
Bits Allocated; for JPEG and JPEG 2000 the codestream's own header), not from the bytes present.
Before the fix, a 1 KB RLE file declaring 23170 x 23170 pixels cost the loader 512 MB before its
decode failed; a valid 2 MB RLE image of 8192 x 8192 peaked the worker path (load, preprocess,
heat-map capture) at 4.3 GB and gave a 200 MB Secondary Capture, and its thumbnail cost 900 MB.

The files are built by hand here (an RLE header and PackBits segments, PS3.5 annex G), so a
valid 8192 x 8192 image takes milliseconds to write.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, RLELossless, generate_uid

from dicom_ai.api.dashboard import render_thumbnail
from dicom_ai.config import LimitsSettings
from dicom_ai.pipeline.loading import PixelLimitError, decode, load_frames, load_volume
from dicom_ai.pipeline.preprocessing import unit_image
from dicom_ai.pipeline.preview import model_inputs
from dicom_ai.reporting.capture import MAX_CAPTURE_SIDE, build_heatmap_capture
from dicom_ai.values import HeatMap, ModelRun, PreprocessingSpec
from tests.peers import REPO, sample_file

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
BOMB_SIDE = 23170  # 23170^2 = 536,848,900 pixels: above max_frame_pixels (100,000,000)
BIG_SIDE = 8192
MIB = 1024 * 1024


# -- hand-made RLE files (PS3.5 annex G) ----------------------------------------------------------
def _rle_frame(segments: list[bytes]) -> bytes:
    """An RLE frame: the 64-byte header (segment count, 15 offsets), then the segments."""
    header = np.zeros(16, dtype="<u4")
    header[0] = len(segments)
    offset = 64
    for i, segment in enumerate(segments):
        header[i + 1] = offset
        offset += len(segment)
    return header.tobytes() + b"".join(segments)


def _blocky_segments(rows: int, columns: int, bits: int) -> list[bytes]:
    """PackBits segments of a 12-bit image of 128-pixel blocks: each run one replicate packet."""
    assert columns % 128 == 0
    runs = columns // 128
    values = ((np.arange(rows)[:, None] // 128) * runs + np.arange(runs)[None, :]) * 37 % 4096
    segments = []
    for byte in reversed(range(bits // 8)):  # the most significant byte's segment first
        packets = np.empty((rows, runs, 2), dtype=np.uint8)
        packets[..., 0] = 0x81  # -127: repeat the next byte 128 times (G.3.1)
        packets[..., 1] = (values >> (8 * byte)) & 0xFF
        segments.append(packets.tobytes())
    return segments


def blocky_values(rows: int, columns: int) -> np.ndarray:
    """The pixel values :func:`write_rle` encodes (without ``segments``)."""
    runs = columns // 128
    blocks = ((np.arange(rows)[:, None] // 128) * runs + np.arange(runs)[None, :]) * 37 % 4096
    return np.repeat(blocks, 128, axis=1).astype(np.uint16)


def write_rle(path: Path, rows: int, columns: int, *, bits: int = 16, frames: int = 1,
              segments: list[bytes] | None = None, study_uid: str | None = None,
              patient: tuple[str, str] = ("Pixel^Bomb", "PIXEL-1")) -> Dataset:
    """Write a CR image in RLE Lossless; by default a valid blocky image, else `segments`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID(study_uid) if study_uid else generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "PX1"
    ds.StudyID = "1"
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "dicom-ai tests"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.1, 0.1]
    if frames > 1:
        ds.NumberOfFrames = frames
    frame = _rle_frame(segments if segments is not None else _blocky_segments(rows, columns, bits))
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_rle_bomb(path: Path, side: int = BOMB_SIDE, **kwargs: Any) -> Dataset:
    """About 1 KB declaring ``side x side`` 8-bit pixels: one 8-packet segment."""
    return write_rle(path, side, side, bits=8, segments=[bytes([0x81, 0]) * 8], **kwargs)


def _traced(step: Callable[[], Any]) -> tuple[Any, int]:
    """`step`'s result and the peak of what it allocated (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        result = step()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- declared sizes -------------------------------------------------------------------------------
@pytest.fixture
def bomb(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.dcm"
    write_rle_bomb(path)
    assert path.stat().st_size < 2048
    return path


def _entry_points() -> dict[str, Callable[[Path], Any]]:
    spec = PreprocessingSpec(input_shape=(64, 64))
    return {
        "load_frames": lambda p: load_frames([p]),
        "load_volume": lambda p: load_volume([p]),
        "decode": lambda p: decode(pydicom.dcmread(p)),
        "model_inputs": lambda p: model_inputs([p], spec),
        "render_thumbnail": lambda p: render_thumbnail(p),
    }


@pytest.mark.parametrize("entry", sorted(_entry_points()))
def test_declared_matrix_above_the_limit_is_refused_before_decoding(bomb: Path, entry: str
                                                                    ) -> None:
    def refused() -> PixelLimitError:
        with pytest.raises(PixelLimitError) as raised:
            _entry_points()[entry](bomb)
        return raised.value

    error, peak = _traced(refused)
    message = str(error)
    assert f"{BOMB_SIDE} x {BOMB_SIDE} pixels" in message
    assert "536,848,900" in message
    assert "limits.max_frame_pixels (100,000,000)" in message
    assert "Pixel^Bomb" not in message
    assert "PIXEL-1" not in message
    # Before: 512 MB (the decoder's output buffer) before the decode failed.
    assert peak < 16 * MIB, f"{peak / MIB:.0f} MiB allocated for a refused file"


def test_declared_bytes_above_the_limit_are_refused(tmp_path: Path) -> None:
    """70 frames of 4096 x 4096 x 16 bits (2.3 GB decoded) in 8 KB; each frame is fine."""
    path = tmp_path / "frames.dcm"
    write_rle(path, 4096, 4096, frames=70, segments=[bytes([0x81, 0]) * 8] * 2)
    assert path.stat().st_size < 16 * 1024
    def refused() -> PixelLimitError:
        with pytest.raises(PixelLimitError) as raised:
            load_frames([path])
        return raised.value

    error, peak = _traced(refused)
    message = str(error)
    assert "4096 x 4096 pixels x 70 frames x 1 samples x 16 bits allocated" in message
    assert "2,348,810,240 bytes decoded" in message
    assert "limits.max_pixel_bytes (2,147,483,648)" in message
    assert peak < 16 * MIB


def test_limits_are_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "small.dcm"
    write_rle(path, 256, 512)
    (frame,) = load_frames([path])
    np.testing.assert_array_equal(frame.array, blocky_values(256, 512))
    exact = LimitsSettings(max_frame_pixels=256 * 512, max_pixel_bytes=256 * 512 * 2)
    assert load_frames([path], limits=exact)[0].array.shape == (256, 512)
    with pytest.raises(PixelLimitError, match=r"limits.max_frame_pixels \(131,071\)"):
        load_frames([path], limits=LimitsSettings(max_frame_pixels=256 * 512 - 1))
    with pytest.raises(PixelLimitError, match=r"262,144 bytes decoded, above limits"):
        decode(pydicom.dcmread(path), limits=LimitsSettings(max_pixel_bytes=256 * 512 * 2 - 1))


def _patched_j2k(side: int) -> Dataset:
    """pydicom's 64 x 64 JPEG 2000 MR with a SIZ marker claiming ``side x side`` (one tile)."""
    ds = pydicom.dcmread(sample_file("MR_small_jp2klossless.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    siz = frame.index(b"\xff\x51")  # ISO/IEC 15444-1 A.5.1: Xsiz, Ysiz, offsets, tile size
    size = struct.pack(">IIIIII", side, side, 0, 0, side, side)
    frame = frame[:siz + 6] + size + frame[siz + 30:]
    ds.PixelData = encapsulate([frame])
    return ds


def _patched_jpeg(side: int) -> Dataset:
    """pydicom's 100 x 100 baseline JPEG with a start of frame claiming ``side x side``."""
    ds = pydicom.dcmread(sample_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sof = frame.index(b"\xff\xc0")  # ITU-T T.81 B.2.2: length, precision, Y, X
    frame = frame[:sof + 5] + struct.pack(">HH", side, side) + frame[sof + 9:]
    ds.PixelData = encapsulate([frame])
    return ds


@pytest.mark.parametrize(("patched", "side"), [(_patched_j2k, 20000), (_patched_jpeg, 60000)])
def test_codestream_larger_than_its_header_is_refused(patched: Callable[[int], Dataset],
                                                      side: int) -> None:
    """The JPEG 2000 decoder sizes its output from SIZ: 20000^2 in a 64^2 header cost 873 MB."""
    ds = patched(side)
    rows, columns = int(ds.Rows), int(ds.Columns)
    def refused() -> PixelLimitError:
        with pytest.raises(PixelLimitError) as raised:
            decode(ds)
        return raised.value

    error, peak = _traced(refused)
    assert f"declares {side} x {side} pixels" in str(error)
    assert f"the header {rows} x {columns}" in str(error)
    assert peak < 16 * MIB
    assert decode(patched(rows)).shape[:2] == (rows, columns), "a true codestream decodes"


# -- bounded memory within the limits -------------------------------------------------------------
def _without_voi(ds: Dataset) -> Dataset:
    ds = ds.copy()
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if keyword in ds:
            del ds[keyword]
    return ds


@pytest.mark.parametrize("name", [
    "CT_small.dcm",  # MONOCHROME2, rescale, no VOI: the min/max of the whole frame
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # a dataset window
    "RG1_UNCR.dcm",  # MONOCHROME1
    "mlut_18.dcm",  # a modality LUT sequence
    "vlut_04.dcm",  # a VOI LUT sequence
    "US1_UNCR.dcm",  # RGB
    "OBXXXX1A.dcm",  # PALETTE COLOR
])
@pytest.mark.parametrize("keep_aspect", [False, True])
def test_strips_give_the_whole_frame_result(name: str, keep_aspect: bool) -> None:
    ds = pydicom.dcmread(sample_file(name))
    arr = ds.pixel_array
    for header in (ds, _without_voi(ds)):
        for shape in ((64, 48), (96, 160)):
            whole = unit_image(arr, header, shape, keep_aspect=keep_aspect)
            strips = unit_image(arr, header, shape, keep_aspect=keep_aspect, strip_above=0,
                                strip_pixels=arr.shape[1] * 7)  # uneven strips of 7 rows
            assert strips.shape == whole.shape
            assert strips.dtype == np.float32
            np.testing.assert_allclose(strips, whole, rtol=0, atol=1e-5)


def test_a_large_frame_is_taken_in_strips() -> None:
    """6144^2 (above STRIP_ABOVE_PIXELS): the whole frame's result in a bounded memory."""
    side = 6144
    ramp = np.arange(side, dtype=np.uint16)
    large = (ramp[:, None] + 3 * ramp[None, :]) % 4096
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    strips, strips_peak = _traced(lambda: unit_image(large, ds, (128, 96)))
    whole, whole_peak = _traced(lambda: unit_image(large, ds, (128, 96), strip_above=side ** 2))
    np.testing.assert_allclose(strips, whole, rtol=0, atol=1e-5)
    assert whole_peak > side * side * 4, "the whole frame takes a float32 copy at least"
    # A strip (4 Mpixel: its masked copy and float32 values) and the row pass: about 46 MiB
    # measured, the same for any frame size.
    assert strips_peak < 64 * MIB, f"{strips_peak / MIB:.0f} MiB for strips"


def test_heatmap_capture_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "source.dcm"
    source = write_rle(path, 3072, 2048, segments=[b"\x81\x00"] * 2)  # header only matters
    heat = np.zeros((3072, 2048), np.float32)
    heat[1000:1200, 900:1100] = 1.0
    display = np.tile(np.linspace(0, 1, 2048, dtype=np.float32), (3072, 1))
    run = ModelRun(model_name="chest-nodule", model_version="1.0.0", task="classification",
                   study_instance_uid=str(source.StudyInstanceUID),
                   series_instance_uid=str(source.SeriesInstanceUID), findings=[], heatmaps=[])
    uid = str(source.SOPInstanceUID)
    sc = build_heatmap_capture(HeatMap(uid, heat, display), source, run,
                               series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    assert (sc.Rows, sc.Columns) == (MAX_CAPTURE_SIDE, 683)
    assert len(sc.PixelData) == MAX_CAPTURE_SIDE * 683 * 3
    # The same area: pixels 3 times larger (3072 / 1024 and 2048 / 683).
    assert [round(float(v), 4) for v in sc.PixelSpacing] == [0.3, 0.2999]
    assert "scaled from 3072 x 2048" in sc.DerivationDescription
    hot = sc.pixel_array[1100 // 3, 1000 // 3].astype(int)
    assert hot[0] > hot[2] + 50, "the hot square is still where it was"
    # Arrays already of the capture's matrix (what the worker makes) give the same size.
    small = HeatMap(uid, np.zeros((1024, 683), np.float32), np.zeros((1024, 683), np.float32))
    again = build_heatmap_capture(small, source, run, series_instance_uid=generate_uid(),
                                  sop_instance_uid=generate_uid())
    assert (again.Rows, again.Columns) == (1024, 683)


# -- the worker path of an 8192 x 8192 image, measured in a clean process -------------------------
_WORKER_PATH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def measure(step):
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now
        base = status("VmRSS")
        result = step()
        return result, status("VmHWM") - base

    from dicom_ai.api.dashboard import render_thumbnail
    from dicom_ai.inference.spec import read_spec
    from dicom_ai.runner.analysis import analyse
    from dicom_ai.reporting import build_heatmap_capture

    spec = read_spec(Path("dicom_ai/inference/bundled/chest-nodule/1.0.0"))

    class Model:  # the bundled model's spec; a constant output keeps TensorFlow out
        def __init__(self):
            self.spec = spec
        def predict(self, inputs):
            return np.full((len(inputs), 1), 0.9, np.float32)

    def explainer(images, output_index=0):  # a Grad-CAM-like blob at the model's input size
        h, w = images.shape[1:3]
        yy, xx = np.mgrid[0:h, 0:w]
        blob = np.exp(-((yy - h / 3) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 8) ** 2))
        return np.stack([blob.astype(np.float32)] * len(images))

    path = Path(sys.argv[1])
    warm = Path(sys.argv[2])  # a small image first: imports and caches are not growth
    analysis = analyse([warm], Model(), seed="warm", explainer=explainer)
    build_heatmap_capture(analysis.run.heatmaps[0], analysis.datasets[0], analysis.run,
                          series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")
    render_thumbnail(warm)

    def job():
        analysis = analyse([path], Model(), seed="big", explainer=explainer)
        sc = build_heatmap_capture(analysis.run.heatmaps[0], analysis.datasets[0],
                                   analysis.run, series_instance_uid="1.2.3",
                                   sop_instance_uid="1.2.3.5")
        return int(sc.Rows), int(sc.Columns), len(sc.PixelData)

    (rows, columns, sc_bytes), job_growth = measure(job)
    png, thumbnail_growth = measure(lambda: render_thumbnail(path))
    print(json.dumps({"job_growth": job_growth, "sc": [rows, columns, sc_bytes],
                      "thumbnail_growth": thumbnail_growth, "png": len(png)}))
""")


def test_worker_path_of_a_large_image_is_bounded(tmp_path: Path) -> None:
    """Load, preprocess, heat-map capture and thumbnail of a valid 2 MB RLE 8192^2 image.

    Measured here: about 260 MB of peak growth for the job (the decoded frame, 128 MB, and the
    decoder's copy of it) and the same for the thumbnail; before: 4.3 GB and 900 MB.
    """
    big, warm = tmp_path / "big.dcm", tmp_path / "warm.dcm"
    write_rle(big, BIG_SIDE, BIG_SIDE)
    write_rle(warm, 512, 512)
    assert big.stat().st_size < 3 * MIB
    done = subprocess.run([sys.executable, "-c", _WORKER_PATH, str(big), str(warm)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    decoded = BIG_SIDE * BIG_SIDE * 2
    assert figures["sc"] == [1024, 1024, 1024 * 1024 * 3], "a 3 MB capture, not 200 MB"
    assert figures["job_growth"] < 3 * decoded, figures  # 384 MB; before: 4.3 GB
    assert figures["thumbnail_growth"] < 3 * decoded, figures  # before: 900 MB
    assert 0 < figures["png"] < 64 * 1024
