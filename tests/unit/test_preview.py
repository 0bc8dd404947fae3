"""Preview: spec files, model inputs as a PNG, and every corpus file previews or is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_ai.exceptions import DicomAIError
from dicom_ai.pipeline.loading import DecodeError, LoadError
from dicom_ai.pipeline.preprocessing import PreprocessingError
from dicom_ai.pipeline.preview import SpecError, load_spec, model_inputs, preview, write_preview
from dicom_ai.values import PreprocessingSpec
from tests.peers import make_ct_series, sample_file
from tests.unit.test_scan import _corpus

SPEC = PreprocessingSpec(input_shape=(64, 64), channels=3, normalization="minmax",
                         min_input_size=8)
REFUSALS = (DecodeError, LoadError, PreprocessingError)


def test_a_toml_spec_loads(tmp_path: Path) -> None:
    """A [preprocessing] table in TOML becomes a PreprocessingSpec."""
    path = tmp_path / "spec.toml"
    path.write_text('[preprocessing]\ninput_shape = [224, 224]\nchannels = 3\nwindow = "lung"\n'
                    'keep_aspect = true\nnormalization = "imagenet"\n'
                    "target_spacing = [1.0, 1.0, 1.0]\n")
    spec = load_spec(path)
    assert spec.input_shape == (224, 224)
    assert spec.window_values == (-600.0, 1500.0)
    assert spec.keep_aspect
    assert spec.target_spacing == (1.0, 1.0, 1.0)


def test_a_bare_json_spec_loads(tmp_path: Path) -> None:
    """A JSON file with the spec's keys at the top level is read too."""
    path = tmp_path / "spec.json"
    path.write_text('{"input_shape": [32, 48], "channels": 1, '
                    '"window": {"center": 40, "width": 400}}')
    spec = load_spec(path)
    assert spec.input_shape == (32, 48)
    assert spec.window_values == (40.0, 400.0)


def test_a_bad_key_is_refused_by_name(tmp_path: Path) -> None:
    """An unknown key and a bad value are refused with an error naming each key."""
    path = tmp_path / "spec.toml"
    path.write_text("[preprocessing]\ninput_shape = [224, 4]\nchanels = 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert isinstance(info.value, DicomAIError)
    message = str(info.value)
    assert "preprocessing.chanels" in message
    assert "preprocessing.input_shape.1" in message


def test_a_broken_or_missing_spec_file_is_refused(tmp_path: Path) -> None:
    """TOML syntax errors and missing files are SpecErrors too."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[preprocessing\n")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(broken)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_preview_of_ct_small(tmp_path: Path) -> None:
    """CT_small gives one PNG of the spec's input shape; steps name the modality LUT and resize."""
    spec = PreprocessingSpec(input_shape=(48, 80), channels=3, window="lung", min_input_size=8)
    out = tmp_path / "ct.png"
    steps = preview(Path(sample_file("CT_small.dcm")), spec, out)
    with Image.open(out) as image:
        assert image.size == (80, 48)
        assert image.mode == "RGB"
    assert any(step.startswith("modality LUT: slope 1 intercept -1024") for step in steps)
    assert "resize 128x128 -> 48x80 (stretched)" in steps
    assert "window: lung (C -600, W 1500)" in steps
    assert "normalise: minmax" in steps


def test_preview_of_a_ct_series_with_target_spacing_is_a_montage(tmp_path: Path) -> None:
    """A CT series is resampled as a volume and shown as a grid of its slices."""
    make_ct_series(tmp_path / "ct", 6, size=64)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    spec = PreprocessingSpec(input_shape=(32, 32), channels=1, window="soft-tissue",
                             min_input_size=8, target_spacing=(2.0, 1.0, 1.0))
    arrays, steps = model_inputs(sorted((tmp_path / "ct").glob("*.dcm")), spec)
    assert len(arrays) == 3  # 6 slices 1 mm apart resampled to 2 mm
    assert all(a.shape == (32, 32, 1) and a.dtype == np.float32 for a in arrays)
    assert any(step.startswith("resample: 6x64x64") for step in steps)
    out = tmp_path / "montage.png"
    assert preview(tmp_path / "ct", spec, out) == steps
    with Image.open(out) as image:
        assert image.size == (2 * 32, 2 * 32)  # 3 tiles on a 2x2 grid
        assert image.mode == "L"


def test_write_preview_rescales_each_array_for_display(tmp_path: Path) -> None:
    """One array gives one image spanning 0..255; a constant array is black."""
    out = tmp_path / "one.png"
    write_preview([np.linspace(-2, 3, 16 * 8, dtype=np.float32).reshape(16, 8, 1)], out)
    with Image.open(out) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (16, 8)
    assert (pixels.min(), pixels.max()) == (0, 255)
    write_preview([np.ones((8, 8, 3), np.float32)] * 2, tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as image:
        assert image.size == (16, 8)
        assert not np.asarray(image).any()
    with pytest.raises(PreprocessingError):
        write_preview([], tmp_path / "none.png")


def test_a_folder_without_dicom_files_is_refused(tmp_path: Path) -> None:
    """A folder of non-DICOM files is a LoadError, not a crash."""
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(LoadError, match="no DICOM files"):
        preview(tmp_path, SPEC, tmp_path / "out.png")


# -- the corpus walk ----------------------------------------------------------------------------
FILES = _corpus()
#: Files whose preview raises something other than a refusal: bugs in loading/preprocessing.
KNOWN_BUGS: dict[str, str] = {}


def _param(path: Path) -> object:
    reason = KNOWN_BUGS.get(path.name)
    if reason is None:
        return pytest.param(path, id=path.name)
    return pytest.param(path, id=path.name, marks=pytest.mark.xfail(strict=True, reason=reason))


@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_every_corpus_file_previews_or_is_refused(path: Path, tmp_path: Path) -> None:
    """Each receivable test file gives a PNG of finite float32 inputs, or a clear refusal."""
    out = tmp_path / "preview.png"
    refusal: DicomAIError | None = None
    try:
        arrays, steps = model_inputs([path], SPEC)
    except REFUSALS as exc:
        refusal = exc
    if refusal is not None:
        assert str(refusal).strip(), f"{type(refusal).__name__} without a message"
        return
    assert arrays
    assert steps
    for array in arrays:
        assert array.dtype == np.float32
        assert array.shape == (64, 64, 3)
        assert np.isfinite(array).all()
    write_preview(arrays, out)
    columns = int(np.ceil(np.sqrt(len(arrays))))
    rows = int(np.ceil(len(arrays) / columns))
    with Image.open(out) as image:
        assert image.size == (64 * columns, 64 * rows)
