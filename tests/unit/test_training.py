"""Training end to end on CPU, resume, evaluation through the serving path, the models CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_ai.inference.registry import Registry
from dicom_ai.inference.runtime import load_predictor
from dicom_ai.inference.spec import read_spec
from dicom_ai.training.augment import AugmentationSpec
from dicom_ai.training.dataset import load_inputs, read_samples
from dicom_ai.training.evaluate import evaluate_model
from dicom_ai.training.synth import synthesize
from dicom_ai.training.train import TrainError, TrainOptions, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cr_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cr")
    synthesize(out, studies=24, seed=31, modality="CR", positive_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def trained(cr_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny-nodule"
    lines: list[str] = []
    result = train(TrainOptions(
        data=cr_set, labels=cr_set / "labels.csv", arch="seed-cnn", out=out, epochs=2,
        input_size=64, seed=1, version="0.1.0", augment=AugmentationSpec(horizontal_flip=True)),
        say=lines.append)
    assert result.spec.name == "tiny-nodule"
    # Chest images have a laterality: the asked-for flip is switched off, and said so.
    assert "horizontal flip switched off: laterality matters for CHEST" in lines
    assert any(line.startswith("epoch 2/2") for line in lines)
    assert any("split by patient" in line for line in lines)
    return out


def test_training_writes_a_registered_ready_folder(trained: Path, tmp_path: Path) -> None:
    spec = read_spec(trained)
    assert spec.task == "classification"
    assert spec.input_shape == (64, 64, 1)
    assert spec.modalities == ["CR"]
    assert spec.outputs[0].finding.meaning == "Nodule"
    assert 0.0 <= spec.outputs[0].threshold <= 1.0
    assert spec.training["split"]["by"] == "patient"
    assert spec.training["augmentation"]["rotation"] == 10.0
    assert spec.training["augmentation"]["horizontal_flip"] is False
    assert "roc_auc" in spec.provenance.metrics
    for name in ("training_curves.png", "validation_roc.png", "history.json"):
        assert (trained / "report" / name).stat().st_size > 0
    history = json.loads((trained / "report" / "history.json").read_text())
    assert len(history["loss"]) == 2
    assert not (trained / "cache").exists()
    # Loadable by the runtime and registrable.
    predictor = load_predictor(trained)
    assert predictor.predict(np.zeros((3, 64, 64, 1), np.float32)).shape == (3, 1)
    entry = Registry(tmp_path / "models", bundled_root=None).add(trained)
    assert entry.active


def test_resume_continues_from_the_checkpoint(cr_set: Path, trained: Path) -> None:
    lines: list[str] = []
    # The folder holds a finished model: a fresh run there is refused, a resume extends it.
    with pytest.raises(TrainError, match="already holds a model"):
        train(TrainOptions(data=cr_set, labels=cr_set / "labels.csv", arch="seed-cnn",
                           out=trained, epochs=3, input_size=64))
    result = train(TrainOptions(
        data=cr_set, labels=cr_set / "labels.csv", arch="seed-cnn", out=trained, epochs=3,
        input_size=64, seed=1, version="0.1.1", resume=True), say=lines.append)
    assert "resuming after epoch 2" in lines
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["3/3"]
    assert len(result.history["loss"]) == 3


def test_training_refuses_what_cannot_train(cr_set: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="unknown architecture 'resnet9000'"):
        train(TrainOptions(data=cr_set, labels=cr_set / "labels.csv", arch="resnet9000",
                           out=tmp_path / "x"))
    with pytest.raises(TrainError, match="nothing to resume"):
        train(TrainOptions(data=cr_set, labels=cr_set / "labels.csv", arch="seed-cnn",
                           out=tmp_path / "y", resume=True))


def test_evaluation_runs_the_serving_path(trained: Path, cr_set: Path, tmp_path: Path) -> None:
    result = evaluate_model(trained, cr_set, cr_set / "labels.csv", out=tmp_path / "report",
                            n_bootstrap=200)
    assert result["model"] == "tiny-nodule"
    assert result["n"] == 24
    for key in ("roc_auc", "precision", "recall", "specificity", "accuracy", "f1", "brier",
                "ece", "pr_auc", "roc_auc_ci95", "confusion",
                "threshold_at_target_sensitivity"):
        assert key in result
    confusion = result["confusion"]
    assert sum(confusion.values()) == 24
    # The predictions behind it are the runtime's on the serving inputs.
    spec = read_spec(trained)
    samples = read_samples(cr_set, cr_set / "labels.csv")
    probs = load_predictor(trained).predict(np.asarray(load_inputs(samples, spec.preprocessing)))
    positive = probs[:, 0] >= spec.outputs[0].threshold
    assert int(positive.sum()) == confusion["tp"] + confusion["fp"]
    card = (tmp_path / "report" / "model_card.md").read_text()
    assert "synthetic phantoms only" in card
    assert "not for clinical use" in card
    for name in ("roc.png", "pr.png", "calibration.png", "metrics.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def cli(*args: str, data_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_AI_STORAGE__ROOT": str(data_root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "dicom_ai.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_models_and_evaluate_cli(trained: Path, cr_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    added = cli("models", "add", str(trained), data_root=root)
    assert added.returncode == 0, added.stderr
    listed = cli("models", "list", "--json", data_root=root)
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    mine = [e for e in entries if e["name"] == "tiny-nodule"]
    assert len(mine) == 1
    assert mine[0]["active"]
    assert mine[0]["task"] == "classification"
    assert entries[0]["bundled"] or not any(e["bundled"] for e in entries)
    shown = cli("models", "show", "tiny-nodule", "--json", data_root=root)
    assert json.loads(shown.stdout)["spec"]["outputs"][0]["finding"]["value"] == "27925004"
    again = cli("models", "add", str(trained), data_root=root)
    assert again.returncode == 1
    assert "already registered" in again.stderr
    missing = cli("models", "activate", "tiny-nodule", "9.9.9", data_root=root)
    assert missing.returncode == 1
    assert "no version '9.9.9'" in missing.stderr
    evaluated = cli("evaluate", "--model", "tiny-nodule", "--data", str(cr_set), "--labels",
                    str(cr_set / "labels.csv"), "--json", "--bootstrap", "200", data_root=root)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["model"] == "tiny-nodule"
    assert {"roc_auc", "precision", "recall", "specificity", "accuracy"} <= set(result)


def test_transfer_learning_from_a_local_weights_file(cr_set: Path, tmp_path: Path) -> None:
    """A keras.applications backbone: weights from a local file, frozen then fine-tuned."""
    from dicom_ai.training.architectures import build_backbone

    weights = tmp_path / "mobilenetv2-notop.weights.h5"
    build_backbone("mobilenetv2", (32, 32, 3), seed=9).save_weights(weights)
    lines: list[str] = []
    result = train(TrainOptions(
        data=cr_set, labels=cr_set / "labels.csv", arch="mobilenetv2", out=tmp_path / "mnv2",
        epochs=2, input_size=32, backbone_weights=weights, seed=2, batch_size=8,
        augment=AugmentationSpec(enabled=False)), say=lines.append)
    stages = [line for line in lines if line.startswith("stage:")]
    assert stages == ["stage: frozen backbone, epochs 1-1",
                      "stage: fine-tuning the last 50% of the backbone, epochs 2-2"]
    spec = result.spec
    assert spec.preprocessing.channels == 3
    assert spec.preprocessing.normalization == "imagenet"
    assert spec.training["backbone_weights"] == weights.name
    assert spec.training["frozen_epochs"] == 1
    assert load_predictor(tmp_path / "mnv2").predict(
        np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 1)
