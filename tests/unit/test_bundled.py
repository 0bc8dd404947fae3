"""The bundled models: shipped, registered first, loadable, explainable; their recipe still runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_ai.inference.registry import BUNDLED_ROOT, DEFAULT_MODEL, Registry
from dicom_ai.inference.runtime import load_predictor
from dicom_ai.training.bundled import (
    CLASSIFIER,
    PROTOCOLS,
    SEGMENTER,
    Recipe,
    backbone_weights_name,
    build_bundled,
    curve_summary,
    protocol_summary,
)
from dicom_ai.training.dataset import load_inputs, read_samples
from dicom_ai.training.synth import synthesize


def test_bundled_models_are_listed_first_and_load(tmp_path: Path) -> None:
    entries = Registry(tmp_path / "models").entries()
    names = [e.name for e in entries]
    # The default first, then the other bundled models by name.
    assert names[:3] == [DEFAULT_MODEL, "chest-ct-nodule", SEGMENTER]
    assert all(e.bundled and e.active for e in entries[:3])
    classifier = load_predictor(entries[0].path)
    assert classifier.spec.task == "classification"
    assert classifier.spec.modalities == ["CR", "DX"]
    assert "synthetic phantoms" in classifier.spec.provenance.notes
    assert classifier.spec.provenance.metrics["roc_auc"] >= 0.95
    volume = load_predictor(entries[1].path)
    assert (volume.spec.task, volume.spec.preprocessing.input_kind) == ("segmentation", "slices")
    assert volume.spec.modalities == ["CT"]
    segmenter = load_predictor(entries[2].path)
    assert segmenter.spec.task == "segmentation"
    for entry in entries[:3]:
        size = sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())
        assert size < 8_000_000, f"{entry.name} ships {size} bytes"
        assert (entry.path / "report" / "test" / "model_card.md").is_file()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthesize(out, studies=16, seed=777, modality="CR", positive_fraction=1.0, difficulty=0.3)
    return out


def test_gradcam_highlights_the_nodule_on_positive_phantoms(phantoms: Path) -> None:
    """Grad-CAM of the bundled classifier puts more heat on the lesion than on the rest."""
    from dicom_ai.inference.explain import GradCam
    from dicom_ai.inference.postprocess import to_image_space

    entry = Registry(phantoms / "models").get(DEFAULT_MODEL)
    predictor: Any = load_predictor(entry.path)
    samples = read_samples(phantoms, phantoms / "labels.csv")
    inputs = np.asarray(load_inputs(samples, entry.spec.preprocessing))
    probs = predictor.predict(inputs)[:, 0]
    detected = probs >= entry.spec.outputs[0].threshold
    assert detected.mean() >= 0.75  # easy (difficulty 0.3) positives are found
    heat = GradCam(predictor.model)(inputs)
    ratios = []
    for sample, prob, cam in zip(samples, probs, heat, strict=True):
        if prob < entry.spec.outputs[0].threshold or sample.mask_path is None:
            continue
        mask = np.load(sample.mask_path) > 0
        image_heat = to_image_space(cam, entry.spec.preprocessing, mask.shape)
        # The lesion's neighbourhood (it is a few pixels at the model's scale) vs the rest.
        ratios.append(float(image_heat[mask].mean()) / max(float(image_heat[~mask].mean()), 1e-6))
    assert ratios
    assert float(np.median(ratios)) > 2.0


def test_the_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """The recipe that made the bundled models, on a tiny budget, so it cannot rot."""
    results = tmp_path / "learning_curve.json"
    protocols = tmp_path / "transfer_protocol.json"
    summary = build_bundled(tmp_path / "work", tmp_path / "bundled", tmp_path / "weights",
                            Recipe.tiny(), curve_results=results, protocol_results=protocols)
    for name in (CLASSIFIER, SEGMENTER):
        folder = tmp_path / "bundled" / name / "1.0.0"
        assert load_predictor(folder).spec.name == name
        assert not (folder / "checkpoints").exists()
        assert (folder / "report" / "test" / "metrics.json").is_file()
    assert (tmp_path / "weights" / backbone_weights_name(64)).is_file()
    assert "roc_auc" in summary["models"][CLASSIFIER]["test"]
    assert "dice_mean" in summary["models"][SEGMENTER]["test"]
    assert [r["studies"] for r in summary["learning_curve"]["sizes"]] == [12]
    assert len(summary["learning_curve_runs"]) == 1
    assert (tmp_path / "bundled" / CLASSIFIER / "1.0.0" / "report" / "learning_curve.png").is_file()
    saved = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert saved["recipe"]["train_studies"] == 24
    assert BUNDLED_ROOT.is_dir()
    # The protocol step: every protocol once per subset, scored on validation studies that are
    # training studies no subset drew from.
    written_protocols = json.loads(protocols.read_text())
    assert [r["protocol"] for r in written_protocols["runs"]] == list(PROTOCOLS)
    assert written_protocols["summary"]["best_pretrained"] in set(PROTOCOLS) - {"scratch"}
    selection = tmp_path / "work" / "protocol"
    validation = {r["SOPInstanceUID"] for r in _rows(selection / "validation.csv")}
    pool = {r["SOPInstanceUID"] for r in _rows(selection / "pool.csv")}
    subset = {r["SOPInstanceUID"] for r in _rows(selection / "8-seed5" / "labels.csv")}
    assert len(validation) == 10
    assert len(pool) == 14
    assert not validation & pool
    assert subset <= pool
    # The results file resumes the grid: a pair it holds for these weights is not trained again.
    written = json.loads(results.read_text())
    assert [(r["studies"], r["seed"]) for r in written["runs"]] == [(12, 5)]
    assert written["backbone"]["pretraining"]["images"] == 8
    [pair] = list((tmp_path / "work").glob("curve-12-seed5-*"))  # named by the backbone
    shutil.rmtree(pair)
    again = build_bundled(tmp_path / "work", tmp_path / "bundled", tmp_path / "weights",
                          Recipe.tiny(), steps=("curve",), curve_results=results)
    assert again["learning_curve_runs"] == written["runs"]
    assert not pair.exists()
    # A curve that reuses this file's scratch arms trains only the pretrained arm.
    reused = build_bundled(tmp_path / "work", tmp_path / "bundled", tmp_path / "weights",
                           Recipe.tiny(), steps=("curve",), curve_results=tmp_path / "other.json",
                           scratch_from=results)
    [row] = reused["learning_curve_runs"]
    assert row["scratch_reused"] is True
    assert row["scratch_auc"] == written["runs"][0]["scratch_auc"]
    assert (pair / "pretrained").is_dir()
    assert not (pair / "scratch").exists()


def _rows(labels: Path) -> list[dict[str, str]]:
    with labels.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_protocol_summary_picks_the_best_pretrained_protocol() -> None:
    rows = [{"studies": n, "seed": seed, "protocol": protocol, "validation_auc": auc + 0.01 * seed}
            for n in (25, 50) for seed in (1, 2)
            for protocol, auc in (("scratch", 0.9), ("full", 0.6), ("head-only", 0.7))]
    summary = protocol_summary(rows)
    assert summary["best_pretrained"] == "head-only"  # scratch is the reference, not a choice
    assert summary["protocols"]["full"]["mean_auc"] == pytest.approx(0.615)
    assert summary["protocols"]["head-only"]["sizes"] == {"25": pytest.approx(0.715),
                                                          "50": pytest.approx(0.715)}


def test_curve_summary_pairs_runs_of_the_same_seed() -> None:
    """Means per size, paired differences, wins and a one-sided signed-rank test."""
    runs = [{"studies": n, "seed": seed, "scratch_auc": base, "pretrained_auc": base + gain}
            for n, base in ((25, 0.55), (50, 0.65), (200, 0.90))
            for seed, gain in ((5, 0.05), (6, 0.03), (7, -0.01))]
    summary = curve_summary(runs)
    first = summary["sizes"][0]
    assert first["studies"] == 25
    assert first["seeds"] == 3
    assert first["scratch_auc_mean"] == pytest.approx(0.55)
    assert first["pretrained_auc_mean"] == pytest.approx(0.55 + 0.07 / 3)
    assert first["pretrained_wins"] == 2
    assert summary["all"]["pairs"] == 9
    assert summary["small"]["pairs"] == 6
    assert summary["all"]["mean_difference"] == pytest.approx(0.07 / 3)
    # 6 of 9 pairs better by more than the 3 worse ones: significant one-sided at 5%.
    assert summary["all"]["wilcoxon_p_one_sided"] < 0.05
    flipped = curve_summary([{**r, "scratch_auc": r["pretrained_auc"],
                              "pretrained_auc": r["scratch_auc"]} for r in runs])
    assert flipped["all"]["wilcoxon_p_one_sided"] > 0.5
