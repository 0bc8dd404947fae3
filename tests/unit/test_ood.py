"""The out-of-distribution score (dicom_ai.inference.ood) and the bundled model's statistics.

The statistics themselves (Ledoit-Wolf shrinkage, Mahalanobis distance, quantile threshold,
the file) are checked on Gaussian data; the bundled chest-nodule classifier's ``ood.npz`` is
checked on what it is for: held-out synthetic chest CR stays below the threshold, while pydicom's
real radiographs (chest and extremity CR, which the classifier calls "nodule" at p ~ 1.0) and
other modalities are flagged, from the same forward pass as the probabilities.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from dicom_ai.inference.ood import (
    OOD_FILE,
    OodStats,
    fit_stats,
    ledoit_wolf,
    read_stats,
    write_stats,
)
from dicom_ai.inference.registry import BUNDLED_ROOT
from dicom_ai.inference.runtime import Predictor, load_predictor
from dicom_ai.training.ood_check import score_auc, score_files
from dicom_ai.training.synth import synthesize
from tests.peers import sample_file

BUNDLED = BUNDLED_ROOT / "chest-nodule" / "1.0.0"
# pydicom's real images by group (each through the model's own preprocessing).
REAL_CHEST_CR = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
REAL_OTHER = ("RG3_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm",
              "emri_small.dcm")


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    samples: NDArray[np.float64] = rng.normal(size=(n, d)) @ mixing * np.linspace(0.1, 10, d)
    return samples + shift


def test_ledoit_wolf_is_invertible_with_fewer_samples_than_features() -> None:
    x = _gaussian(20, 64, seed=1)
    covariance, shrinkage = ledoit_wolf(x - x.mean(axis=0))
    assert 0 < shrinkage <= 1
    assert np.linalg.matrix_rank(covariance) == 64  # the sample covariance has rank 19
    np.testing.assert_allclose(covariance, covariance.T)


def test_threshold_flags_about_the_chosen_share_and_shifted_inputs_all() -> None:
    fit, heldout = _gaussian(2000, 16, seed=1), _gaussian(1000, 16, seed=2)
    stats = fit_stats(fit, heldout, layer="gap", quantile=0.99)
    assert stats.n_fit == 2000
    assert stats.n_heldout == 1000
    fresh = _gaussian(5000, 16, seed=3)
    assert 0.003 < stats.flagged(stats.score(fresh)).mean() < 0.03
    assert stats.flagged(stats.score(_gaussian(200, 16, seed=4, shift=25.0))).all()
    # The distance is affine-invariant up to shrinkage: rescaling a unit hardly matters.
    factor = np.r_[1000.0, np.ones(15)]
    scaled = fit_stats(fit * factor, heldout * factor, layer="gap")
    assert scaled.threshold == pytest.approx(stats.threshold, rel=0.05)


def test_statistics_round_trip_through_the_model_folder(tmp_path: Path) -> None:
    assert read_stats(tmp_path) is None  # no file: OOD is off for that model
    stats = fit_stats(_gaussian(300, 8, seed=1), _gaussian(100, 8, seed=2), layer="gap")
    write_stats(stats, tmp_path)
    back = read_stats(tmp_path)
    assert isinstance(back, OodStats)
    assert (back.layer, back.quantile, back.n_fit) == ("gap", 0.99, 300)
    assert back.threshold == pytest.approx(stats.threshold)
    x = _gaussian(10, 8, seed=5)
    np.testing.assert_allclose(back.score(x), stats.score(x), rtol=1e-4)
    (tmp_path / OOD_FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        read_stats(tmp_path)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return load_predictor(BUNDLED)


@pytest.fixture(scope="module")
def synth_scores(predictor: Predictor,
                 tmp_path_factory: pytest.TempPathFactory) -> NDArray[np.float32]:
    """Scores of 24 held-out synthetic chest CR studies (a seed never trained on)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, studies=24, seed=4242, modality="CR")
    scores, _ = score_files(predictor, sorted(p for p in out.rglob("*.dcm")
                                              if "masks" not in p.parts))
    assert len(scores) == 24
    return scores


def test_bundled_classifier_carries_small_statistics(predictor: Predictor) -> None:
    assert (BUNDLED / OOD_FILE).stat().st_size < 100_000
    assert predictor.ood is not None
    assert predictor.ood.layer == "backbone_gap"
    assert predictor.ood.n_fit == 800
    assert predictor.ood.n_heldout == 200


def test_scores_come_from_the_same_forward_pass_as_the_probabilities(
        predictor: Predictor) -> None:
    batch = np.random.default_rng(0).random((3, *predictor.spec.input_shape), np.float32)
    probs, scores = predictor.predict_with_ood(batch)
    np.testing.assert_allclose(probs, predictor.predict(batch), atol=1e-6)
    assert scores is not None
    assert scores.shape == (3,)


def test_synthetic_chest_cr_is_inside_and_real_radiographs_outside(
        predictor: Predictor, synth_scores: NDArray[np.float32]) -> None:
    ood = predictor.ood
    assert ood is not None
    assert ood.flagged(synth_scores).mean() <= 1 / 24  # about 1 % by construction
    chest, chest_probs = score_files(predictor, [Path(sample_file(n)) for n in REAL_CHEST_CR])
    other, _ = score_files(predictor, [Path(sample_file(n)) for n in REAL_OTHER])
    assert len(chest) == len(REAL_CHEST_CR)
    assert len(other) == len(REAL_OTHER)
    # The classifier is confidently wrong on the real chest radiograph; the score says so.
    assert (chest_probs > 0.99).all()
    assert ood.flagged(chest).all()
    assert ood.flagged(other).all()
    assert score_auc(synth_scores, chest) == 1.0
    assert score_auc(synth_scores, other) == 1.0


def test_a_model_without_statistics_has_no_score(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(BUNDLED, folder, ignore=shutil.ignore_patterns(OOD_FILE, "report"))
    plain = load_predictor(folder)
    assert plain.ood is None
    batch = np.zeros((2, *plain.spec.input_shape), np.float32)
    probs, scores = plain.predict_with_ood(batch)
    assert scores is None
    assert probs.shape == (2, 1)


def test_training_writes_statistics_only_for_networks_with_pooled_features(
        tmp_path: Path) -> None:
    import keras

    from dicom_ai.training.train import fit_ood

    folder = tmp_path / "trained"
    shutil.copytree(BUNDLED, folder, ignore=shutil.ignore_patterns(OOD_FILE, "report"))
    model = keras.saving.load_model(folder / "model.keras", compile=False)
    rng = np.random.default_rng(1)
    shape = model.input_shape[1:]
    stats = fit_ood(model, rng.random((24, *shape), np.float32),
                    rng.random((8, *shape), np.float32), folder)
    assert stats is not None
    assert stats.layer == "backbone_gap"
    assert stats.n_fit == 24
    loaded = load_predictor(folder)  # the served predictor picks the file up
    assert loaded.ood is not None
    assert loaded.ood.threshold == pytest.approx(stats.threshold, rel=1e-5)

    inputs = keras.Input(shape)
    fully_convolutional = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same")(inputs))
    plain = tmp_path / "unet-like"
    plain.mkdir()
    assert fit_ood(fully_convolutional, rng.random((4, *shape), np.float32),
                   rng.random((2, *shape), np.float32), plain) is None
    assert not (plain / OOD_FILE).exists()


def test_drift_counts_cover_the_window_and_image_findings_only(db_url: str) -> None:
    """jobs.ood_counts (the drift gauge's query) on SQLite and PostgreSQL."""
    from datetime import UTC, datetime, timedelta

    from storage import jobs
    from storage.db import Database

    db = Database(db_url)
    db.upgrade()
    now = datetime.now(UTC)

    def row(model: str, sop: str, score: float | None, flagged: bool) -> dict[str, object]:
        return {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
                "sop_instance_uid": sop, "frame_number": None, "model_name": model,
                "model_version": "1.0.0", "label": "nodule", "code_value": "27925004",
                "code_scheme": "SCT", "code_meaning": "Nodule", "probability": 0.9,
                "threshold": 0.5, "present": True, "location_kind": None, "location": None,
                "segment_number": None, "heatmap_path": None, "tracking_uid": f"2.25.{sop}9",
                "ood_score": score, "out_of_distribution": flagged}

    try:
        for when, findings in (
            (now - timedelta(hours=2), [row("a", "1", 30.0, True)]),  # before the window
            (now, [row("a", "2", 30.0, True), row("a", "3", 5.0, False),
                   row("a", "", 30.0, True),  # a study decision: not an image again
                   row("b", "4", None, False)]),  # a model without statistics
        ):
            with db.write_session() as session:
                job = jobs.create_job(session, study_instance_uid="1.2.3",
                                      series_instance_uids=["1.2.3.4"], route="r",
                                      model_name="a", max_attempts=1, event_id=None, now=when)
                job_id = job.id
            with db.write_session() as session:
                assert jobs.claim_job(session, job_id, owner="t", lease_seconds=60, now=when)
                assert jobs.complete_job(session, job_id, owner="t", model_version="1.0.0",
                                         findings=findings, results=[], timings={}, now=when)
        with db.sessions() as session:
            assert jobs.ood_counts(session, since=now - timedelta(hours=1)) == {"a": (2, 1)}
    finally:
        db.dispose()
