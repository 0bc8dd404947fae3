"""The volume inference core: resampling and back, sliding windows, lesions, on known volumes.

Spheres of known radius on grids of known geometry, and a synthetic chest CT (written by
``synthesize(..., chest_ct=...)``, read back by ``load_volume``) whose ground-truth masks and
``lesions.csv`` were computed by the writer without this module.
"""

from __future__ import annotations

import csv
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from dicom_ai.pipeline.loading import Volume, load_volume
from dicom_ai.pipeline.volume import (
    Grid,
    VolumeError,
    blend_weights,
    find_lesions,
    measure_lesions,
    modality_volume,
    patch_starts,
    resample,
    slice_stack,
    sliding_window,
    sliding_window_slices,
    source_lesions,
    to_source,
)
from dicom_ai.training.synth import ChestCT, read_lesion_masks, synthesize

# An oblique grid: rows and columns rotated 30 degrees about z, anisotropic spacing.
_A = math.radians(30.0)
ORIENTATION = (math.cos(_A), math.sin(_A), 0.0, -math.sin(_A), math.cos(_A), 0.0)
SPACING = (2.5, 0.7, 0.7)
ORIGIN = (-80.0, 12.5, -40.0)


def _sphere(shape: tuple[int, int, int], spacing: tuple[float, float, float],
            centre: tuple[float, float, float], radius_mm: float) -> NDArray[np.bool_]:
    """Voxels whose centre lies within ``radius_mm`` of ``centre`` (voxel indices)."""
    idx = np.indices(shape, dtype=np.float64)
    dist2 = sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return np.asarray(dist2 <= radius_mm ** 2)


def _grid(shape: tuple[int, int, int]) -> Grid:
    return Grid(shape, SPACING, ORIGIN, ORIENTATION)


def _patient(index: tuple[float, float, float]) -> NDArray[np.float64]:
    """Patient position of a voxel index, written out from PS3.3 C.7.6.2.1.1."""
    row, col = np.array(ORIENTATION[:3]), np.array(ORIENTATION[3:])
    normal = np.cross(row, col)
    s, r, c = index
    return np.asarray(np.array(ORIGIN) + c * SPACING[2] * row + r * SPACING[1] * col
                      + s * SPACING[0] * normal)


# -- resampling -------------------------------------------------------------------------------
def test_resample_then_inverse_gives_back_the_shape_and_the_mask() -> None:
    shape = (24, 90, 100)
    centre = (11.3, 44.6, 52.1)
    mask = _sphere(shape, SPACING, centre, 12.0)
    resampled = resample(mask.astype(np.float32), _grid(shape), (1.0, 1.0, 1.0))
    assert resampled.array.dtype == np.float32
    assert resampled.array.shape == (60, 63, 70)
    assert resampled.grid.spacing == pytest.approx((1.0, 1.0, 1.0), rel=0.01)
    # The resampled grid knows where its voxels are: the sphere's centre agrees.
    there = measure_lesions((resampled.array >= 0.5).astype(np.uint8), resampled.grid)[0]
    assert np.allclose(there.centroid_patient, _patient(centre), atol=0.25)

    back = to_source(resampled.array, resampled, threshold=0.5)
    assert back.shape == shape
    assert back.dtype == bool
    wrong = back ^ mask
    boundary = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    assert not (wrong & ~boundary).any()  # every disagreement is within one voxel of the edge
    assert wrong.sum() < 0.1 * mask.sum()
    probabilities = to_source(resampled.array, resampled)
    assert probabilities.dtype == np.float32
    assert probabilities.shape == shape


def test_to_source_maps_channels_and_refuses_another_grid() -> None:
    shape = (10, 20, 30)
    resampled = resample(np.zeros(shape, dtype=np.int16), _grid(shape), (5.0, 1.4, 1.4))
    two = np.stack([resampled.array, resampled.array + 1.0], axis=-1)
    back = to_source(two, resampled)
    assert back.shape == (*shape, 2)
    assert np.allclose(back[..., 1], 1.0)
    with pytest.raises(VolumeError, match="resampled grid"):
        to_source(np.zeros((3, 3, 3), dtype=np.float32), resampled)


def test_modality_volume_applies_each_slices_rescale() -> None:
    from pydicom.dataset import Dataset

    datasets = []
    for intercept in (-1024, 0):
        ds = Dataset()
        ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored = 1, intercept, 16
        ds.PixelRepresentation, ds.BitsAllocated = 0, 16
        datasets.append(ds)
    volume = Volume(np.full((2, 4, 4), 1000, dtype=np.uint16), (1.0, 1.0, 1.0),
                    (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), ["a", "b"], [0, 0],
                    datasets=datasets)
    hu = modality_volume(volume)
    assert hu.dtype == np.float32
    assert hu[0].min() == hu[0].max() == -24.0
    assert hu[1].min() == 1000.0


# -- sliding window ---------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [(8, 16, 16), (7, 13, 19), (40, 40, 40)],
                         ids=["divides", "does-not-divide", "larger-than-volume"])
@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
def test_sliding_window_with_identity_predict_gives_the_input_back(
        patch: tuple[int, int, int], blend: str) -> None:
    volume = np.random.default_rng(1).normal(size=(16, 32, 48)).astype(np.float32)
    calls: list[tuple[int, ...]] = []

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        calls.append(batch.shape)
        assert batch.dtype == np.float32
        assert batch.shape[1:] == (*patch, 1)
        return batch[..., 0]

    out = sliding_window(volume, predict, patch, overlap=0.5,
                         blend=blend, batch_size=3)  # type: ignore[arg-type]
    assert out.dtype == np.float32
    assert out.shape == volume.shape
    np.testing.assert_allclose(out, volume, rtol=1e-5, atol=1e-5)
    assert all(shape[0] <= 3 for shape in calls)


def test_sliding_window_blends_overlaps_and_keeps_output_channels() -> None:
    volume = np.random.default_rng(2).normal(size=(12, 30, 30)).astype(np.float32)

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.concatenate([batch, 2.0 * batch], axis=-1)  # two output channels

    out = sliding_window(volume, predict, (8, 16, 16), overlap=0.25)
    assert out.shape == (*volume.shape, 2)
    np.testing.assert_allclose(out[..., 1], 2.0 * volume, rtol=1e-5, atol=1e-5)
    # A constant per patch (its start) blends into a smooth mix where patches overlap.
    starts = iter(range(10_000))

    def per_patch(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.stack([np.full(batch.shape[1:4], next(starts), dtype=np.float32)
                         for _ in batch])

    mixed = sliding_window(volume, per_patch, (8, 16, 16), overlap=0.5, batch_size=4)
    assert len(np.unique(mixed)) > 8


def test_patch_grid_and_weights() -> None:
    assert patch_starts(100, 40, 0.5) == [0, 20, 40, 60]
    assert patch_starts(101, 40, 0.5) == [0, 15, 30, 46, 61]
    assert patch_starts(30, 40, 0.5) == [0]
    assert patch_starts(40, 40, 0.0) == [0]
    for mode in ("gaussian", "linear", "constant"):
        for w in blend_weights((9, 16), mode):
            assert w.dtype == np.float32
            assert (w > 0).all()
            assert w.max() == pytest.approx(1.0)
            np.testing.assert_allclose(w, w[::-1])  # symmetric about the centre
    gauss = blend_weights((64,), "gaussian")[0]
    assert gauss[0] < 0.01 < gauss[16]


def test_sliding_window_refuses_what_it_cannot_do() -> None:
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    with pytest.raises(VolumeError, match="overlap"):
        sliding_window(volume, lambda b: b, (4, 4, 4), overlap=1.0)
    with pytest.raises(VolumeError, match="patch"):
        sliding_window(volume, lambda b: b[:, :2], (4, 4, 4))
    with pytest.raises(VolumeError, match="patches for"):
        sliding_window(volume, lambda b: b[:1], (4, 4, 4), batch_size=2)
    with pytest.raises(VolumeError, match="odd"):
        sliding_window_slices(volume, lambda b: b, (4, 4), k=2)


def test_slices_input_stacks_neighbours_and_replicates_the_edges() -> None:
    volume = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 20, 24), np.float32)
    stack = slice_stack(volume, 0, 5)
    assert stack.shape == (20, 24, 5)
    assert list(stack[0, 0]) == [0, 0, 0, 1, 2]
    assert list(slice_stack(volume, 4, 3)[0, 0]) == [3, 4, 4]

    seen: list[tuple[int, ...]] = []

    def previous_slice(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        seen.append(batch.shape)
        return batch[..., 0]  # channel 0 is the slice below (the first one repeated)

    out = sliding_window_slices(volume, previous_slice, (16, 16), k=3, overlap=0.5,
                                batch_size=4)
    assert all(shape[1:] == (16, 16, 3) for shape in seen)
    np.testing.assert_allclose(out[:, 0, 0], [0, 0, 1, 2, 3], atol=1e-5)
    identity = sliding_window_slices(volume, lambda b: b[..., 1:2], (16, 16), k=3)
    np.testing.assert_allclose(identity, volume, atol=1e-5)


def test_sliding_window_memory_is_the_accumulator_plus_a_few_batches() -> None:
    """Stated bound: for a 300 x 256 x 256 float32 input (75 MiB), the peak traced memory of
    the sliding window is at most the output accumulator (the input's size) plus 32 MiB; a
    float64 accumulator, or a second full-size array for the normaliser, would exceed it."""
    volume = np.ones((300, 256, 256), dtype=np.float32)
    patch = (48, 96, 96)

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return batch[..., 0] * np.float32(2.0)

    tracemalloc.start()
    try:
        out = sliding_window(volume, predict, patch, overlap=0.5, batch_size=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert float(out[150, 128, 128]) == pytest.approx(2.0)
    assert peak < volume.nbytes + 32 * 2 ** 20, peak


# -- lesions ----------------------------------------------------------------------------------
def test_lesion_measures_match_the_analytical_sphere() -> None:
    shape = (60, 160, 160)
    spacing = (1.0, 0.5, 0.5)
    grid = Grid(shape, spacing, ORIGIN, ORIENTATION)
    radius = 10.0
    centre = (30.2, 70.4, 90.7)
    big = _sphere(shape, spacing, centre, radius)
    small = _sphere(shape, spacing, (10.0, 20.0, 20.0), 3.0)
    speck = np.zeros(shape, dtype=bool)
    speck[55, 150, 150] = True
    hu = np.where(big, 40.0, -850.0).astype(np.float32)
    hu[small] = -20.0
    values = (big | small | speck).astype(np.float32) * 0.9

    lesions = find_lesions(values, grid, threshold=0.5, intensity=hu, min_voxels=5)
    assert [le.label for le in lesions] == [1, 2]
    sphere = lesions[0]
    analytic = 4.0 / 3.0 * math.pi * radius ** 3
    assert sphere.volume_mm3 == pytest.approx(analytic, rel=0.03)
    assert sphere.voxels == int(big.sum())
    assert sphere.longest_axial_diameter_mm == pytest.approx(2 * radius, abs=spacing[1])
    assert np.allclose(sphere.centroid_voxel, centre, atol=0.05)
    # The centroid in patient coordinates, against the geometry written out by hand.
    row, col = np.array(ORIENTATION[:3]), np.array(ORIENTATION[3:])
    expected = (np.array(ORIGIN) + centre[2] * spacing[2] * row + centre[1] * spacing[1] * col
                + centre[0] * spacing[0] * np.cross(row, col))
    assert np.allclose(sphere.centroid_patient, expected, atol=0.05)
    assert sphere.mean_intensity == pytest.approx(40.0)
    assert lesions[1].volume_mm3 == pytest.approx(4.0 / 3.0 * math.pi * 27.0, rel=0.1)
    assert lesions[1].mean_intensity == pytest.approx(-20.0)
    assert len(find_lesions(values, grid, threshold=0.5)) == 3  # the speck, kept
    assert find_lesions(values, grid, threshold=0.95) == []


# -- the synthetic chest CT -------------------------------------------------------------------
@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chest-ct")
    synthesize(out, studies=2, seed=4, modality="CT", positive_fraction=1.0, compress=False,
               chest_ct=ChestCT(matrix=128, pixel_spacing=(2.6, 3.0), slice_spacings=(2.5, 4.0),
                                slices=(60, 90), lesions=(2, 4)))
    return out


def test_synthetic_ct_loads_in_order_and_its_masks_measure_as_labelled(chest: Path) -> None:
    with (chest / "lesions.csv").open(newline="") as fh:
        labelled = list(csv.DictReader(fh))
    series = sorted({row["SeriesInstanceUID"] for row in labelled})
    assert len(series) == 2
    for series_uid in series:
        files = sorted(chest.glob(f"*/{series_uid}/*.dcm"))
        volume = load_volume(files)
        rows = [r for r in labelled if r["SeriesInstanceUID"] == series_uid]
        masks = read_lesion_masks(chest / rows[0]["mask_path"])
        # Slices in order along the normal (+z, feet to head), at the stated spacing.
        z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
        assert z == sorted(z)
        assert volume.warnings == []
        assert volume.spacing == pytest.approx(masks.spacing)
        assert volume.origin == pytest.approx(masks.origin, abs=1e-3)
        assert volume.sop_instance_uids == masks.sop_instance_uids
        assert masks.labels.shape == volume.array.shape
        assert 60 <= volume.array.shape[0] <= 90

        hu = modality_volume(volume)
        measured = measure_lesions(masks.labels, Grid.of(volume), intensity=hu)
        assert [le.label for le in measured] == [int(r["lesion"]) for r in rows]
        for lesion, row in zip(measured, rows, strict=True):
            assert lesion.voxels == int(row["voxels"])
            assert lesion.volume_mm3 == pytest.approx(float(row["volume_mm3"]), rel=1e-3)
            centroid = [float(row[f"centroid_{a}_mm"]) for a in "xyz"]
            assert np.allclose(lesion.centroid_patient, centroid, atol=0.01)
            pixel = volume.spacing[2]
            assert lesion.longest_axial_diameter_mm == pytest.approx(
                float(row["longest_axial_diameter_mm"]), abs=1.2 * pixel)
            # The mean HU inside sits on the lesion's side of its background.
            assert lesion.mean_intensity is not None
            contrast = float(row["contrast_hu"])
            assert (lesion.mean_intensity - float(row["background_hu"])) * contrast > 0


def test_synthetic_ct_through_resample_window_and_back(chest: Path) -> None:
    """The whole core on a real series: a 'model' that returns its input mask (the ground
    truth fed as a second channel) through resampling, a 2.5D window and the inverse."""
    with (chest / "lesions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    series_uid = rows[0]["SeriesInstanceUID"]
    volume = load_volume(sorted(chest.glob(f"*/{series_uid}/*.dcm")))
    masks = read_lesion_masks(chest / rows[0]["mask_path"])
    resampled = resample((masks.labels > 0).astype(np.float32), Grid.of(volume),
                         (2.0, 2.0, 2.0))
    probabilities = sliding_window_slices(resampled.array, lambda b: b[..., 1], (64, 64), k=3)
    back = to_source(probabilities, resampled)
    found = find_lesions(back, Grid.of(volume), min_voxels=3)
    truth = measure_lesions(masks.labels, Grid.of(volume))
    large = [t for t in truth if t.longest_axial_diameter_mm >= 10.0]
    for t in large:
        nearest = min(found, key=lambda f: float(np.linalg.norm(
            np.subtract(f.centroid_patient, t.centroid_patient))))
        assert np.linalg.norm(np.subtract(nearest.centroid_patient, t.centroid_patient)) < 3.0
        assert nearest.volume_mm3 == pytest.approx(t.volume_mm3, rel=0.35)


# -- uneven slice spacing ---------------------------------------------------------------------
#: 2.5 mm slices, then 5 mm ones, with one 5 mm slice missing (a 10 mm gap): real positions.
UNEVEN = (*(2.5 * k for k in range(12)), 32.5, 37.5, 47.5, 52.5, 57.5, 62.5)


def _uneven_sphere(centre_mm: tuple[float, float, float], radius: float,
                   in_plane: tuple[int, int]) -> NDArray[np.bool_]:
    """A sphere sampled on the :data:`UNEVEN` slices (centre: along the normal, row, column
    in mm from voxel (0, 0, 0))."""
    z = np.asarray(UNEVEN)[:, None, None]
    r = np.arange(in_plane[0])[None, :, None] * SPACING[1]
    c = np.arange(in_plane[1])[None, None, :] * SPACING[2]
    dist2 = (z - centre_mm[0]) ** 2 + (r - centre_mm[1]) ** 2 + (c - centre_mm[2]) ** 2
    return np.asarray(dist2 <= radius ** 2)


def test_an_uneven_series_resamples_from_its_real_positions_and_maps_back_onto_them() -> None:
    """A blob across the change of spacing and the missing slice: the model's even grid holds
    it where it is in the patient, and masks, volumes and centroids map back onto the real
    slices (a grid that assumed even spacing would stretch it along the normal)."""
    shape = (len(UNEVEN), 60, 60)
    centre, radius = (33.0, 21.0, 20.0), 11.0
    truth = _uneven_sphere(centre, radius, shape[1:])
    grid = Grid(shape, (5.0, *SPACING[1:]), ORIGIN, ORIENTATION, UNEVEN)
    expected = _patient((0.0, centre[1] / SPACING[1], centre[2] / SPACING[2])) + \
        centre[0] * np.cross(ORIENTATION[:3], ORIENTATION[3:])

    resampled = resample(truth.astype(np.float32), grid, (1.0, 1.0, 1.0))
    # The even grid covers the real extent: 62.5 mm + half a 5 mm gap at each end.
    assert resampled.array.shape[0] == round((UNEVEN[-1] + 5.0) / 1.0)
    assert resampled.grid.positions is None
    there = measure_lesions((resampled.array >= 0.5).astype(np.uint8), resampled.grid)[0]
    assert np.allclose(there.centroid_patient, expected, atol=0.6)
    assert there.volume_mm3 == pytest.approx(4.0 / 3.0 * math.pi * radius ** 3, rel=0.1)

    back = to_source(resampled.array, resampled, threshold=0.5)
    assert back.shape == shape
    holding = np.flatnonzero(truth.any(axis=(1, 2)))
    assert list(np.flatnonzero(back.any(axis=(1, 2)))) == list(holding)
    for k in holding:  # each real slice gets its own cross-section back
        assert abs(int(back[k].sum()) - int(truth[k].sum())) <= 0.15 * truth[k].sum() + 8

    # Measured on the real slices: each slice counts for its share of the gaps around it.
    measured = measure_lesions(back.astype(np.uint8), grid)[0]
    assert measured.volume_mm3 == pytest.approx(4.0 / 3.0 * math.pi * radius ** 3, rel=0.1)
    assert np.allclose(measured.centroid_patient, expected, atol=1.0)
    assert grid.slice_extents().sum() == pytest.approx(UNEVEN[-1] + 5.0)

    # The lesions of a model output, found on the source slices without mapping it all back.
    found = source_lesions(resampled.array, resampled, grid, threshold=0.5)
    assert len(found.lesions) == 1
    lesion = found.lesions[0]
    assert lesion.lesion.bbox[0] == (int(holding[0]), int(holding[-1]) + 1)
    full = np.zeros(shape, dtype=bool)
    full[tuple(slice(a, b) for a, b in lesion.lesion.bbox)] = lesion.mask
    assert np.array_equal(full, back)
    assert lesion.lesion.volume_mm3 == pytest.approx(measured.volume_mm3)
    assert lesion.probability == pytest.approx(1.0, abs=1e-5)


def test_a_series_with_a_missing_slice_loads_uneven_and_measures_its_lesions(
        chest: Path, tmp_path: Path) -> None:
    """One slice through the largest lesion removed: load_volume keeps the real positions,
    the grid knows the gap, and the lesion's volume (from the remaining slices, each standing
    for its share of the gaps) stays close to the full series' truth."""
    with (chest / "lesions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    series_uid = rows[0]["SeriesInstanceUID"]
    files = sorted(chest.glob(f"*/{series_uid}/*.dcm"))
    masks = read_lesion_masks(chest / rows[0]["mask_path"])
    full = load_volume(files)
    truth = measure_lesions(masks.labels, Grid.of(full))
    largest = max(truth, key=lambda t: t.voxels)
    (s0, s1) = largest.bbox[0]
    dropped = (s0 + s1) // 2
    assert s1 - s0 >= 3  # the slice dropped lies inside the lesion
    kept = [f for f, uid in zip(files, full.sop_instance_uids, strict=True)
            if uid != full.sop_instance_uids[dropped]]
    assert len(kept) == len(files) - 1
    volume = load_volume(kept)
    grid = Grid.of(volume)
    assert Grid.of(full).positions is None
    assert grid.positions is not None
    gaps = np.diff(grid.positions)
    assert gaps.max() == pytest.approx(2 * full.spacing[0], rel=1e-3)
    assert any("missing slices" in w for w in volume.warnings)

    labels = np.delete(masks.labels, dropped, axis=0)
    measured = {le.label: le for le in measure_lesions(labels, grid)}
    lesion = measured[largest.label]
    # Each remaining slice stands for half the gap to each neighbour (the two next to the
    # missing slice for a full spacing more between them), written out here by hand.
    z = np.asarray(volume.slice_positions)
    extent = np.empty(len(z))
    extent[1:-1] = (z[2:] - z[:-2]) / 2
    extent[0], extent[-1] = z[1] - z[0], z[-1] - z[-2]
    areas = (labels == largest.label).sum(axis=(1, 2)) * full.spacing[1] * full.spacing[2]
    assert lesion.volume_mm3 == pytest.approx(float((areas * extent).sum()), rel=1e-6)
    assert lesion.voxels == int((labels == largest.label).sum())
    # Its centroid is on the real slices: within half a gap of the full series' one.
    assert np.allclose(lesion.centroid_patient, largest.centroid_patient,
                       atol=full.spacing[0])

    # Through the model's even grid and back: the same slices hold the lesion.
    resampled = resample((labels == largest.label).astype(np.float32), grid, (2.0, 2.0, 2.0))
    found = source_lesions(resampled.array, resampled, grid, threshold=0.5, min_voxels=3)
    best = max(found.lesions, key=lambda f: f.lesion.voxels)
    bbox = largest.bbox[0]
    assert abs(best.lesion.bbox[0][0] - bbox[0]) <= 1
    assert abs(best.lesion.bbox[0][1] - (bbox[1] - 1)) <= 1
    # A lesion a few 4 mm slices thick loses its rim to the two thresholds (a 2 mm grid and
    # back): the volume within 40 %, its slices the right ones (above).
    assert best.lesion.volume_mm3 == pytest.approx(lesion.volume_mm3, rel=0.4)
