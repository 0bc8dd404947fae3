"""Model spec validation and the registry: versions side by side, one active, bundled first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.exceptions import ConfigError
from dicom_ai.inference.registry import Registry, RegistryError, version_key
from dicom_ai.inference.spec import (
    NODULE,
    ModelSpec,
    ModelSpecError,
    OutputLabel,
    read_spec,
    write_spec,
)
from dicom_ai.values import PreprocessingSpec


def make_spec(name: str = "chest-nodule", version: str = "1.0.0", **extra: Any) -> ModelSpec:
    return ModelSpec(
        name=name, version=version, task="classification",
        preprocessing=PreprocessingSpec(input_shape=(64, 64), channels=1),
        outputs=[OutputLabel(name="nodule", finding=NODULE, threshold=0.42)],
        **{"modalities": ["CR", "DX"], "body_parts": ["CHEST"], **extra})


def make_folder(base: Path, spec: ModelSpec, network: bytes = b"net") -> Path:
    folder = base / f"{spec.name}-{spec.version}"
    write_spec(spec, folder)
    (folder / spec.network).write_bytes(network)
    return folder


def test_spec_round_trips_through_its_file(tmp_path: Path) -> None:
    spec = make_spec(description="test model")
    folder = make_folder(tmp_path, spec)
    again = read_spec(folder)
    assert again == spec
    assert again.input_shape == (64, 64, 1)
    assert again.backend == "keras"
    assert again.outputs[0].finding.meaning == "Nodule"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"version": "one"}, "version"),
        ({"task": "detection"}, "task"),
        ({"outputs": []}, "outputs"),
        ({"network": "model.pt"}, "network"),
        ({"preprocessing": {"input_shape": [4, 4]}}, "preprocessing.input_shape"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_spec_names_the_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    folder = make_folder(tmp_path, make_spec())
    raw = json.loads((folder / "spec.json").read_text())
    raw.update(change)
    (folder / "spec.json").write_text(json.dumps(raw))
    with pytest.raises(ModelSpecError, match=key.replace(".", r"\.")) as info:
        read_spec(folder)
    assert isinstance(info.value, ConfigError)


def test_missing_network_or_spec_is_refused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, make_spec())
    (folder / "model.keras").unlink()
    with pytest.raises(ModelSpecError, match=r"network file model\.keras"):
        read_spec(folder)
    with pytest.raises(ModelSpecError, match=r"spec\.json is missing"):
        read_spec(tmp_path / "nothing")


def test_applies_to() -> None:
    spec = make_spec()
    assert spec.applies_to("CR", "CHEST")
    assert spec.applies_to("dx", "chest")
    assert not spec.applies_to("CT", "CHEST")
    assert not spec.applies_to("CR", "KNEE")
    anywhere = spec.model_copy(update={"modalities": [], "body_parts": []})
    assert anywhere.applies_to(None, None)


def test_version_order() -> None:
    versions = ["1.10.0", "1.9.0", "1.0.0-rc1", "1.0.0", "2"]
    assert sorted(versions, key=version_key) == ["1.0.0-rc1", "1.0.0", "1.9.0", "1.10.0", "2"]


def test_registry_round_trips_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models", bundled_root=None)
    assert registry.entries() == []
    first = registry.add(make_folder(tmp_path / "src", make_spec(version="1.0.0"), b"one"))
    assert first.active  # the first version of a name becomes active
    second = registry.add(make_folder(tmp_path / "src", make_spec(version="1.1.0"), b"two"))
    assert not second.active  # adding never silently switches what runs
    assert (second.path / "model.keras").read_bytes() == b"two"
    assert [e.version for e in registry.versions("chest-nodule")] == ["1.0.0", "1.1.0"]
    assert registry.get("chest-nodule").version == "1.0.0"

    registry.activate("chest-nodule", "1.1.0")
    assert registry.get("chest-nodule").version == "1.1.0"
    assert [e.active for e in registry.versions("chest-nodule")] == [False, True]
    # A new Registry object (another process) sees the same state.
    assert Registry(tmp_path / "models", bundled_root=None).get("chest-nodule").version == "1.1.0"
    assert registry.get("chest-nodule", "1.0.0").spec.outputs[0].threshold == 0.42


def test_registry_refuses_duplicates_and_unknowns(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models", bundled_root=None)
    folder = make_folder(tmp_path / "src", make_spec())
    registry.add(folder)
    with pytest.raises(RegistryError, match="already registered"):
        registry.add(folder)
    with pytest.raises(RegistryError, match="no model named 'other'"):
        registry.get("other")
    with pytest.raises(RegistryError, match=r"no version '9\.9\.9'"):
        registry.activate("chest-nodule", "9.9.9")
    with pytest.raises(RegistryError, match=r"spec\.json is missing"):
        registry.add(tmp_path)
    # Nothing half-copied is left behind by the refused adds.
    assert sorted(p.name for p in (tmp_path / "models" / "chest-nodule").iterdir()) == [
        "1.0.0", "ACTIVE"]


def test_bundled_models_come_first_and_can_be_superseded(tmp_path: Path) -> None:
    bundled = tmp_path / "bundled"
    for spec in (make_spec(version="1.0.0"), make_spec(name="chest-nodule-seg", version="1.0.0")):
        target = bundled / spec.name / spec.version
        write_spec(spec, target)
        (target / "model.keras").write_bytes(b"bundled")
    registry = Registry(tmp_path / "models", bundled_root=bundled)
    registry.add(make_folder(tmp_path / "src", make_spec(name="another", version="0.1.0")))
    entries = registry.entries()
    assert [(e.name, e.bundled) for e in entries] == [
        ("chest-nodule", True), ("chest-nodule-seg", True), ("another", False)]
    assert all(e.active for e in entries)
    summary = entries[0].summary()
    assert {"name", "version", "task", "active"} <= set(summary)

    # A registered version of a bundled name: the higher version wins unless one is activated.
    registry.add(make_folder(tmp_path / "src", make_spec(version="2.0.0")))
    assert registry.get("chest-nodule").version == "1.0.0"  # the bundled one stays active
    registry.activate("chest-nodule", "2.0.0")
    assert registry.get("chest-nodule").version == "2.0.0"
    registry.activate("chest-nodule", "1.0.0")
    assert registry.get("chest-nodule").bundled


def test_folder_must_match_its_spec(tmp_path: Path) -> None:
    root = tmp_path / "models"
    spec = make_spec()
    write_spec(spec, root / "chest-nodule" / "9.0.0")
    (root / "chest-nodule" / "9.0.0" / "model.keras").write_bytes(b"x")
    with pytest.raises(RegistryError, match="must be <name>/<version>"):
        Registry(root, bundled_root=None).entries()
