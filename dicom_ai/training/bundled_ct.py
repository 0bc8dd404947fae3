"""The reproducible recipe of the bundled chest CT model ``chest-ct-nodule`` (issue 21).

Run (CI does not retrain it; a test runs ``--tiny``)::

    .venv/bin/python -m dicom_ai.training.bundled_ct --work /tmp/ct-work \\
        --out dicom_ai/inference/bundled

Steps, every one seeded (``--steps data,train,evaluate``; a step reuses what an earlier one
left in ``--work``):

1. ``data``: ``dicom-ai synth --modality CT --phantom chest`` training studies (seed
   :attr:`Recipe.train_seed`, 128, 256 and 512 matrices) and held-out test studies (another seed,
   never seen in training). Each training study is loaded as the serving path loads it
   (:func:`~dicom_ai.pipeline.loading.load_volume`, :func:`~dicom_ai.pipeline.volume.resample`
   to :data:`TARGET_SPACING`, the fixed lung window, normalisation ``none``) and its lesion masks
   are resampled onto the same grid; both are cached in ``work/prepared``.
2. ``train``: a small 2.5D U-Net (:func:`~dicom_ai.training.architectures.build_unet`, the
   ``k = 3`` adjacent resampled slices as channels) on patches drawn afresh every epoch, half of
   them centred on a lesion (each lesion equally likely, whatever its size: small nodules are
   the hard ones) and half anywhere; flips in-plane and along the slices. Loss: binary
   cross-entropy plus soft Dice. The network is fully convolutional, so the weights trained on
   :attr:`Recipe.train_patch` patches are served in larger :attr:`Recipe.serve_patch` windows
   (fewer, bigger forward passes over a 300 x 512 x 512 study).
3. ``evaluate``: the model folder is written, loaded with
   :func:`~dicom_ai.inference.runtime.load_predictor` and run over every held-out study by
   :func:`~dicom_ai.inference.volumes.analyse_volumes` (the job runner's own path: load, resample,
   window, sliding window, back to the source slices, connected components). Each lesion it
   reports is matched to the ground truth (:mod:`~dicom_ai.training.volume_metrics`): FROC,
   Dice, volume and diameter errors with bootstrap CIs over studies, into
   ``report/test/metrics.json``, ``report/test/froc.png`` and ``report/test/model_card.md``
   (the layout of the other bundled models); the training loss in ``report/history.json``.

The synthetic studies are drawn by :func:`~dicom_ai.training.synth.synthesize`; no patient data
is involved and the model card says so.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread

from dicom_ai import __version__
from dicom_ai.inference.runtime import Predictor, load_predictor
from dicom_ai.inference.spec import ModelSpec, OutputLabel, Provenance, read_spec, write_spec
from dicom_ai.pipeline.loading import load_volume
from dicom_ai.pipeline.volume import Grid, prepare_volume_input, resample
from dicom_ai.training.report import plot_froc
from dicom_ai.training.synth import ChestCT, read_lesion_masks, synthesize
from dicom_ai.values import CodedConcept, PreprocessingSpec, WindowPreset

__all__ = ["LESION", "MODEL_NAME", "MODEL_VERSION", "TARGET_SPACING", "WINDOW", "PreparedStudy",
           "Recipe", "build_ct_model", "evaluate_folder", "main", "prepare_study"]

MODEL_NAME = "chest-ct-nodule"
MODEL_VERSION = "1.0.0"
#: (slice, row, column) mm the model sees: a 300 x 512 x 512 study at 0.8 mm (410 mm field of
#: view) becomes about 120 x 273 x 273 voxels, four 256 x 256 windows per slice.
TARGET_SPACING = (2.5, 1.5, 1.5)
#: A fixed lung window (the ``lung`` preset, -1350..150 HU): lung, nodules, ground glass and the
#: soft tissue of the liver all fall inside it, and the same HU always gives the same input
#: (per-volume min-max normalisation made hundreds of false lesions).
WINDOW: WindowPreset = "lung"
#: SCT 52988006 "Lesion": the phantom puts lesions in the lungs and the liver.
LESION = CodedConcept(value="52988006", scheme="SCT", meaning="Lesion")


@dataclass(frozen=True)
class Recipe:
    """Sizes and seeds of one build; :meth:`tiny` is the seconds-long test version.

    Attributes
    ----------
    train_studies : tuple of int
        Training studies at matrix 128, 256 and 512 (the same field of view, 3.6-4 mm down to
        0.6-1 mm pixels: served studies are 512, tests use smaller ones).
    test_studies : tuple of int
        Held-out test studies at matrix 128, 256 and 512.
    train_seed, test_seed : int
        ``synthesize`` seeds: different, so no test study is a training study.
    positive_fraction : float
        Fraction of training studies with lesions (the rest teach what is not a lesion).
    test_positive_fraction : float
        The same for the test studies (negatives count towards false positives per volume).
    slices : tuple of int
        Slice-count range of every synthetic study.
    k : int
        Adjacent slices per 2.5D input.
    train_patch, serve_patch : int
        In-plane patch size in training and in the served spec.
    base_filters, depth : int
        U-Net size.
    epochs, patches_per_epoch, batch_size : int
        Schedule: every epoch draws ``patches_per_epoch`` new patches.
    learning_rate : float
        Adam's rate; halved for the last third of the epochs.
    positive_share : float
        Share of the patches centred on a lesion.
    seed : int
        Initialisation, patch sampling and bootstrap seed.
    bootstrap : int
        Bootstrap resamples of the CIs.
    """

    train_studies: tuple[int, int, int] = (8, 24, 12)
    test_studies: tuple[int, int, int] = (6, 12, 4)
    train_seed: int = 3101
    test_seed: int = 4202
    positive_fraction: float = 0.85
    test_positive_fraction: float = 0.75
    slices: tuple[int, int] = (100, 300)
    k: int = 3
    train_patch: int = 128
    serve_patch: int = 256
    base_filters: int = 16
    depth: int = 3
    epochs: int = 24
    patches_per_epoch: int = 1536
    batch_size: int = 16
    learning_rate: float = 1e-3
    positive_share: float = 0.5
    seed: int = 21
    bootstrap: int = 1000

    @classmethod
    def tiny(cls) -> Recipe:
        """A seconds-long build for tests: a few short studies, one epoch, a tiny network."""
        return cls(train_studies=(0, 2, 0), test_studies=(0, 2, 0), slices=(24, 30), base_filters=4,
                   depth=2, epochs=1, patches_per_epoch=32, batch_size=8, train_patch=64,
                   serve_patch=128, bootstrap=50)


@dataclass(frozen=True)
class PreparedStudy:
    """One training study on the model's grid.

    Attributes
    ----------
    image : numpy.ndarray
        ``float16`` ``(slices, rows, columns)``: windowed 0..1 values, as served.
    truth : numpy.ndarray
        ``bool``, same shape: lesion voxels (the synth masks resampled, at least half inside).
    lesions : list of numpy.ndarray
        Per lesion, its voxel indices ``(n, 3)`` (for lesion-centred patches).
    """

    image: NDArray[np.float16]
    truth: NDArray[np.bool_]
    lesions: list[NDArray[np.intp]]


def _say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- data
def _synth(out: Path, *, studies: int, seed: int, matrix: int, positive_fraction: float,
           slices: tuple[int, int]) -> None:
    """``synth --modality CT --phantom chest --matrix`` into ``out`` (once per work folder)."""
    if (out / "labels.csv").exists() or studies == 0:
        return
    options = replace(ChestCT.for_matrix(matrix), slices=slices)
    # Uncompressed: the pixels are the same, and decoding JPEG 2000 would cost minutes.
    synthesize(out, studies=studies, seed=seed, modality="CT",
               positive_fraction=positive_fraction, compress=False, chest_ct=options)


def _matrices(counts: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(matrix, studies, seed offset) per matrix: 256 and 512 first (their seeds came first)."""
    return [(256, counts[1], 0), (512, counts[2], 1), (128, counts[0], 2)]


def _studies(root: Path) -> list[tuple[list[Path], Path | None]]:
    """Per series under a synth folder: its files and its masks file (None: no lesions)."""
    found: list[tuple[list[Path], Path | None]] = []
    if not (root / "labels.csv").exists():
        return found
    with (root / "labels.csv").open(newline="", encoding="ascii") as fh:
        series = list(dict.fromkeys((r["StudyInstanceUID"], r["SeriesInstanceUID"])
                                    for r in csv.DictReader(fh)))
    for study, uid in series:
        files = sorted((root / study / uid).glob("*.dcm"))
        masks = root / "masks" / f"{uid}.npz"
        found.append((files, masks if masks.exists() else None))
    return found


def prepare_study(files: Sequence[Path], masks: Path | None) -> PreparedStudy:
    """A synthetic study on the model's grid, as the serving path computes the model input.

    Parameters
    ----------
    files : sequence of Path
        The series' slices.
    masks : Path or None
        Its ``masks/<series>.npz`` (None for a study without lesions).

    Returns
    -------
    PreparedStudy
    """
    volume = load_volume(files)
    grid = Grid.of(volume)
    # The serving chain itself (prepare_volume_input); of the spec, only the spacing, window
    # and normalisation matter here.
    serving = PreprocessingSpec(input_shape=(8, 8), window=WINDOW, normalization="none",
                                target_spacing=TARGET_SPACING)
    image = prepare_volume_input(volume, grid, serving, keep_modality=False).array
    del volume
    truth = np.zeros(image.shape, dtype=bool)
    lesions: list[NDArray[np.intp]] = []
    if masks is not None:
        labels = read_lesion_masks(masks).labels
        for index in range(1, int(labels.max(initial=0)) + 1):
            # One lesion at a time, resampled as the image is: its voxels at least half inside.
            one = resample((labels == index).astype(np.float32), grid, TARGET_SPACING).array
            inside = one >= 0.5
            if not inside.any():  # smaller than a resampled voxel: its peak voxel stands in
                inside = one >= max(float(one.max()), 1e-6)
            truth |= inside
            lesions.append(np.argwhere(inside))
    return PreparedStudy(image.astype(np.float16), truth, lesions)


def _prepared(work: Path, recipe: Recipe) -> list[PreparedStudy]:
    """The training studies, synthesised and prepared once per work folder."""
    out: list[PreparedStudy] = []
    for matrix, count, offset in _matrices(recipe.train_studies):
        root = work / f"train-{matrix}"
        _synth(root, studies=count, seed=recipe.train_seed + offset, matrix=matrix,
               positive_fraction=recipe.positive_fraction, slices=recipe.slices)
        for i, (files, masks) in enumerate(_studies(root)):
            cache = work / "prepared" / f"{matrix}-{i:03d}.npz"
            if not cache.exists():
                study = prepare_study(files, masks)
                cache.parent.mkdir(parents=True, exist_ok=True)
                arrays: dict[str, Any] = {"image": study.image, "truth": study.truth,
                                          "lesions": np.array(len(study.lesions))}
                for j, voxels in enumerate(study.lesions):
                    arrays[f"lesion_{j}"] = voxels
                np.savez(cache, **arrays)
            with np.load(cache) as npz:
                out.append(PreparedStudy(
                    npz["image"], npz["truth"],
                    [npz[f"lesion_{j}"] for j in range(int(npz["lesions"]))]))
    return out


# --------------------------------------------------------------------------- training
def _patch(study: PreparedStudy, z: int, y: int, x: int, size: int, k: int
           ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The 2.5D input (``size, size, k``) and target (``size, size, 1``) at a corner ``y, x``.

    Slices beyond the volume repeat the edge slice and a plane smaller than the patch is
    padded by edge replication, as :func:`~dicom_ai.pipeline.volume.sliding_window_slices`
    does when serving.
    """
    s = study.image.shape[0]
    picks = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, s - 1)
    image = study.image[picks, y:y + size, x:x + size].astype(np.float32)
    truth = study.truth[z, y:y + size, x:x + size].astype(np.float32)
    pad = ((0, size - image.shape[1]), (0, size - image.shape[2]))
    if pad[0][1] or pad[1][1]:
        image = np.pad(image, ((0, 0), *pad), mode="edge")
        truth = np.pad(truth, pad, mode="edge")
    return np.moveaxis(image, 0, -1), truth[..., None]


def sample_patches(studies: Sequence[PreparedStudy], count: int, size: int, k: int,
                   rng: np.random.Generator, positive_share: float
                   ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``count`` augmented training patches, ``positive_share`` of them around a lesion.

    Parameters
    ----------
    studies : sequence of PreparedStudy
        The prepared training studies.
    count, size, k : int
        Patches, their in-plane size and slices per input.
    rng : numpy.random.Generator
        Draws everything (studies, positions, flips).
    positive_share : float
        Probability that a patch is centred (give or take a quarter patch) on a voxel of a
        lesion drawn uniformly among all lesions.

    Returns
    -------
    tuple of numpy.ndarray
        Inputs ``(count, size, size, k)`` and targets ``(count, size, size, 1)``, ``float32``.
    """
    x_out = np.empty((count, size, size, k), dtype=np.float32)
    y_out = np.empty((count, size, size, 1), dtype=np.float32)
    lesions = [(i, v) for i, st in enumerate(studies) for v in st.lesions]
    for n in range(count):
        if lesions and rng.random() < positive_share:
            i, voxels = lesions[int(rng.integers(len(lesions)))]
            z, cy, cx = (int(v) for v in voxels[int(rng.integers(len(voxels)))])
            cy += int(rng.integers(-size // 4, size // 4 + 1))
            cx += int(rng.integers(-size // 4, size // 4 + 1))
        else:
            i = int(rng.integers(len(studies)))
            shape = studies[i].image.shape
            z = int(rng.integers(shape[0]))
            cy, cx = int(rng.integers(shape[1])), int(rng.integers(shape[2]))
        study = studies[i]
        _, h, w = study.image.shape
        y0 = int(np.clip(cy - size // 2, 0, max(h - size, 0)))
        x0 = int(np.clip(cx - size // 2, 0, max(w - size, 0)))
        image, truth = _patch(study, z, y0, x0, size, k)
        # Flips: left-right and front-back in-plane, and the slice order (head-foot).
        if rng.random() < 0.5:
            image, truth = image[:, ::-1], truth[:, ::-1]
        if rng.random() < 0.5:
            image, truth = image[::-1], truth[::-1]
        if rng.random() < 0.5:
            image = image[..., ::-1]
        x_out[n], y_out[n] = image, truth
    return x_out, y_out


def _loss() -> Any:
    """Binary cross-entropy plus soft Dice over the batch (lesions are a tiny voxel share)."""
    import keras

    bce = keras.losses.BinaryCrossentropy()

    def bce_dice(y_true: Any, y_pred: Any) -> Any:
        inter = keras.ops.sum(y_true * y_pred)
        dice = (2.0 * inter + 1.0) / (keras.ops.sum(y_true) + keras.ops.sum(y_pred) + 1.0)
        return bce(y_true, y_pred) + (1.0 - dice)

    return bce_dice


def train_model(studies: Sequence[PreparedStudy], recipe: Recipe, out: Path) -> dict[str, Any]:
    """Train the 2.5D U-Net; writes ``out/weights.weights.h5`` and returns the history.

    Parameters
    ----------
    studies : sequence of PreparedStudy
        The prepared training studies.
    recipe : Recipe
        Sizes, schedule and seed.
    out : Path
        Folder for the weights.

    Returns
    -------
    dict
        ``loss`` per epoch and ``seconds``.
    """
    import keras

    from dicom_ai.training.architectures import build_unet

    keras.utils.set_random_seed(recipe.seed)
    model = build_unet((recipe.train_patch, recipe.train_patch, recipe.k), 1,
                       base_filters=recipe.base_filters, depth=recipe.depth, seed=recipe.seed)
    optimizer = keras.optimizers.Adam(recipe.learning_rate)
    model.compile(optimizer=optimizer, loss=_loss())
    rng = np.random.default_rng([recipe.seed, 1])
    started = time.perf_counter()
    losses: list[float] = []
    for epoch in range(recipe.epochs):
        if epoch == (2 * recipe.epochs) // 3 and epoch:
            optimizer.learning_rate.assign(recipe.learning_rate / 2)
        x, y = sample_patches(studies, recipe.patches_per_epoch, recipe.train_patch, recipe.k,
                              rng, recipe.positive_share)
        history = model.fit(x, y, batch_size=recipe.batch_size, epochs=1, shuffle=False,
                            verbose=0)
        losses.append(float(history.history["loss"][-1]))
        _say(f"epoch {epoch + 1}/{recipe.epochs}: loss {losses[-1]:.4f} "
             f"({time.perf_counter() - started:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_weights(out / "weights.weights.h5")
    result = {"loss": losses, "seconds": round(time.perf_counter() - started, 1)}
    (out / "history.json").write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- the model folder
def _spec(recipe: Recipe, training: dict[str, Any]) -> ModelSpec:
    prep = PreprocessingSpec(
        input_shape=(recipe.serve_patch, recipe.serve_patch), channels=1, window=WINDOW,
        normalization="none", min_input_size=32, target_spacing=TARGET_SPACING,
        input_kind="slices", slices_k=recipe.k, overlap=0.25, blend="gaussian")
    return ModelSpec(
        name=MODEL_NAME, version=MODEL_VERSION, task="segmentation", network="model.keras",
        preprocessing=prep,
        outputs=[OutputLabel(name="lesion", finding=LESION, threshold=0.5,
                             threshold_method="0.5 (segmentation)")],
        modalities=["CT"], body_parts=["CHEST"],
        # A 2.5 x 1.5 x 1.5 mm voxel of the model grid is about 9 source voxels at 0.8 x 0.8 x
        # 1.25 mm; smaller components are noise at this resolution.
        min_component_pixels=8,
        description=("Chest CT lesion segmentation (2.5D U-Net, 3 adjacent slices at 2.5 x 1.5 "
                     "x 1.5 mm); lesions are connected components on the source slices"),
        provenance=Provenance(code_version=f"dicom-ai {__version__}"),
        training=training,
    )


def write_folder(weights: Path, recipe: Recipe, folder: Path, training: dict[str, Any]) -> None:
    """The model folder: the serving network (``serve_patch`` input) and its spec.

    Parameters
    ----------
    weights : Path
        ``weights.weights.h5`` of :func:`train_model`.
    recipe : Recipe
        Network and input sizes.
    folder : Path
        Created (replaced).
    training : dict
        The spec's free-form training record.
    """
    from dicom_ai.training.architectures import build_unet

    trained = build_unet((recipe.train_patch, recipe.train_patch, recipe.k), 1,
                         base_filters=recipe.base_filters, depth=recipe.depth, seed=recipe.seed)
    trained.load_weights(weights)
    # The same layers at the serving size: convolutions do not depend on the input size.
    serving = build_unet((recipe.serve_patch, recipe.serve_patch, recipe.k), 1,
                         base_filters=recipe.base_filters, depth=recipe.depth, seed=recipe.seed)
    serving.set_weights(trained.get_weights())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    serving.save(folder / "model.keras")
    write_spec(_spec(recipe, training), folder)


# --------------------------------------------------------------------------- evaluation
def _test_studies(work: Path, recipe: Recipe) -> list[tuple[list[Path], Path | None]]:
    found: list[tuple[list[Path], Path | None]] = []
    for matrix, count, offset in _matrices(recipe.test_studies):
        root = work / f"test-{matrix}"
        _synth(root, studies=count, seed=recipe.test_seed + offset, matrix=matrix,
               positive_fraction=recipe.test_positive_fraction, slices=recipe.slices)
        found.extend(_studies(root))
    return found


def evaluate_folder(folder: Path, studies: Sequence[tuple[list[Path], Path | None]],
                    recipe: Recipe, report: Path) -> dict[str, Any]:
    """Serve the model folder over held-out studies and measure it per lesion.

    Every study runs through :func:`~dicom_ai.inference.volumes.analyse_volumes` twice on one
    loaded predictor whose forward passes are remembered: once with the spec as shipped (the
    operating point, Dice, volumes: what a PACS receives) and once with the threshold lowered
    to :data:`~dicom_ai.training.volume_metrics.CANDIDATE_THRESHOLD` (candidates scored by
    their peak probability, for the FROC).

    Parameters
    ----------
    folder : Path
        The model folder.
    studies : sequence of tuple
        Per test series, its files and masks file.
    recipe : Recipe
        Bootstrap size and seed.
    report : Path
        Receives ``metrics.json`` and ``froc.png``.

    Returns
    -------
    dict
        The metrics (:func:`~dicom_ai.training.volume_metrics.volume_report`) plus timings.
    """
    from dicom_ai.inference.volumes import analyse_volumes
    from dicom_ai.training import volume_metrics as vm

    inner = load_predictor(folder, batch_size=8)
    predictor = _Remembering(inner)
    shipped = predictor.spec
    candidates = shipped.model_copy(update={"outputs": [
        shipped.outputs[0].model_copy(update={"threshold": vm.CANDIDATE_THRESHOLD})]})
    operating: list[vm.CaseMatch] = []
    froc_cases: list[vm.CaseMatch] = []
    timings: dict[str, float] = {}
    for files, masks in studies:
        datasets = [dcmread(f, stop_before_pixels=True) for f in files]
        truth_labels = (read_lesion_masks(masks).labels if masks is not None else None)
        for spec, into in ((shipped, operating), (candidates, froc_cases)):
            predictor.spec = spec
            result = analyse_volumes([datasets], predictor, seed="evaluation", skipped=[],
                                     timings=timings)
            assert result is not None
            found = [f for f in result.findings if f.present and f.region is not None]
            shape = found[0].region.shape if found and found[0].region else None
            grid_shape = (truth_labels.shape if truth_labels is not None else shape)
            if grid_shape is None:
                grid_shape = (len(files), int(datasets[0].Rows), int(datasets[0].Columns))
            detections = np.zeros(grid_shape, dtype=np.int32)
            scores: list[float] = []
            for n, finding in enumerate(found, start=1):
                region = finding.region
                assert region is not None
                box = tuple(slice(o, o + s) for o, s in zip(region.offset, region.mask.shape,
                                                            strict=True))
                detections[box][region.mask] = n
                scores.append(finding.probability)
            truth = (truth_labels if truth_labels is not None
                     else np.zeros(grid_shape, dtype=np.uint8))
            spacing = _spacing(datasets)
            into.append(vm.match_lesions(truth, detections, spacing, scores=scores))
        predictor.forget()
    metrics = vm.volume_report(operating, froc_cases, n_boot=recipe.bootstrap, seed=recipe.seed)
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plot_froc(metrics["froc"], report / "froc.png")
    return metrics


def _spacing(datasets: Sequence[Any]) -> tuple[float, float, float]:
    """(slice, row, column) mm of a synthetic series (contiguous slices, square pixels)."""
    row, col = (float(v) for v in datasets[0].PixelSpacing)
    zs = sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)
    dz = float(np.median(np.diff(zs))) if len(zs) > 1 else float(datasets[0].SliceThickness)
    return (dz, row, col)


class _Remembering(Predictor):
    """A predictor that answers a batch it has already seen from memory (the second pass of
    :func:`evaluate_folder` gets the same probabilities without running the network again)."""

    def __init__(self, inner: Predictor) -> None:
        super().__init__(inner.folder, inner.spec, inner.batch_size)
        self.backend = inner.backend
        self._inner = inner
        self._seen: dict[bytes, NDArray[np.float32]] = {}

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        key = hashlib.blake2b(batch.tobytes(), digest_size=16).digest()
        if key not in self._seen:
            self._seen[key] = self._inner._run(batch)
        return self._seen[key]

    def forget(self) -> None:
        """Drop the remembered outputs (one study's worth)."""
        self._seen.clear()


# --------------------------------------------------------------------------- the build
def build_ct_model(work: Path, out: Path, recipe: Recipe,
                   steps: Sequence[str] = ("data", "train", "evaluate")) -> dict[str, Any]:
    """Run the recipe's steps; the last writes ``out/chest-ct-nodule/1.0.0``.

    Parameters
    ----------
    work : Path
        Work folder (synthetic studies, prepared arrays, weights); reused across runs.
    out : Path
        The bundled models folder.
    recipe : Recipe
        Sizes and seeds.
    steps : sequence of str
        Any of ``data``, ``train``, ``evaluate``, in that order.

    Returns
    -------
    dict
        The summary (also ``work/summary.json``).
    """
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary: dict[str, Any] = (json.loads(summary_path.read_text())
                               if summary_path.exists() else {})
    summary["recipe"] = asdict(recipe)
    if "data" in steps or "train" in steps:
        started = time.perf_counter()
        studies = _prepared(work, recipe)
        summary["data_seconds"] = round(time.perf_counter() - started, 1)
        summary["train_lesions"] = sum(len(s.lesions) for s in studies)
        _say(f"{len(studies)} training studies, {summary['train_lesions']} lesions "
             f"({summary['data_seconds']} s)")
        if "train" in steps:
            summary["training"] = train_model(studies, recipe, work / "train")
        del studies
    if "evaluate" in steps:
        from dicom_ai.training import volume_metrics as vm

        history = json.loads((work / "train" / "history.json").read_text())
        n_train = sum(recipe.train_studies)
        training = {
            "arch": "unet-2.5d", "k": recipe.k, "base_filters": recipe.base_filters,
            "depth": recipe.depth, "train_patch": recipe.train_patch, "epochs": recipe.epochs,
            "patches_per_epoch": recipe.patches_per_epoch, "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate, "seed": recipe.seed,
            "positive_share": recipe.positive_share,
            "augmentation": "flips: left-right, front-back, slice order",
            "loss": "binary cross-entropy + soft Dice", "backbone_weights": None,
            "seconds": history["seconds"],
        }
        target = out / MODEL_NAME / MODEL_VERSION
        write_folder(work / "train" / "weights.weights.h5", recipe, target, training)
        started = time.perf_counter()
        tests = _test_studies(work, recipe)
        metrics = evaluate_folder(target, tests, recipe, target / "report" / "test")
        summary["evaluation_seconds"] = round(time.perf_counter() - started, 1)
        test_data = (f"{len(tests)} held-out dicom-ai synth chest CT studies (seeds "
                     f"{recipe.test_seed}..{recipe.test_seed + 2}, matrices 128/256/512: "
                     f"{'/'.join(str(n) for n in recipe.test_studies)})")
        spec = read_spec(target)
        spec = spec.model_copy(update={"provenance": spec.provenance.model_copy(update={
            "training_data": (f"{n_train} dicom-ai synth chest CT studies (seeds "
                              f"{recipe.train_seed}..{recipe.train_seed + 2}, matrices "
                              f"128/256/512: {'/'.join(str(n) for n in recipe.train_studies)}, "
                              f"{recipe.slices[0]}-{recipe.slices[1]} slices)"),
            "metrics": vm.headline(metrics),
            "notes": f"{vm.SYNTHETIC_NOTE} Metrics on {test_data}.",
        })})
        write_spec(spec, target)
        (target / "report" / "test" / "model_card.md").write_text(
            vm.model_card(spec, metrics, test_data, history), encoding="utf-8")
        (target / "report" / "history.json").write_text(json.dumps(history, indent=2))
        summary["metrics"] = vm.headline(metrics)
        _say(json.dumps(summary["metrics"], indent=2))
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main() -> None:
    """``python -m dicom_ai.training.bundled_ct``: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the seconds-long test build")
    parser.add_argument("--steps", default="data,train,evaluate")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    recipe = Recipe.tiny() if args.tiny else Recipe()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {"data", "train", "evaluate"}
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    build_ct_model(args.work, args.out, recipe, steps)


if __name__ == "__main__":
    main()
