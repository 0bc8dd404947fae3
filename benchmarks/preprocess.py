"""Preprocessing overhead: frames/s of decoding alone vs decoding plus ``preprocess_frame``.

Three sets, written to a temporary folder: (a) CR-like images -- ``--cr`` synthetic 512x512
``uint16`` MONOCHROME2 CR instances (12 bits stored, no window: the VOI falls back to min/max),
(b) a CT series of ``--slices`` 512x512 slices from ``tests.peers.make_ct_series``, windowed
with the 'lung' preset, both Explicit VR Little Endian, and (c) the chest phantoms of
``dicom-ai synth --modality CR`` (``--synth`` studies: 256-512 pixels, 12/16 bits, MONOCHROME1/2,
a share RLE, JPEG 2000 or JPEG-LS compressed), with their own windows. The spec is input
(224, 224), 3 channels, minmax normalisation. Each pass reads every file from disk
(``pydicom.dcmread``) and decodes it (``dicom_ai.pipeline.loading.decode``); the full pass
also runs ``preprocess_frame``.
The best of ``--rounds`` counts. The target is an overhead of at most 20 % over decoding.

Run: ``.venv/bin/python -m benchmarks.preprocess [--cr 20] [--slices 40] [--rounds 3]
[--out FILE]``.
Prints a JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_ai.pipeline.loading import decode
from dicom_ai.pipeline.preprocessing import preprocess_frame
from dicom_ai.training.synth import synthesize
from dicom_ai.values import PreprocessingSpec
from tests.peers import make_ct_series

#: The overhead preprocessing may add over decoding.
TARGET_OVERHEAD = 0.20
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def make_cr_set(out: Path, count: int, *, size: int = 512, seed: int = 0) -> list[Path]:
    """Write `count` synthetic CR images (`size` x `size`, 12 bits in uint16, MONOCHROME2)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        # A smooth "body" with noise, so the image is not constant.
        body = 2000.0 + 1500.0 * np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2)
                                        / (2 * (size / 4) ** 2))
        pixels = np.clip(body + rng.normal(0, 60, (size, size)), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CR_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "CR"
        ds.InstanceNumber = i + 1
        ds.PatientID = "BENCH"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        path = out / f"cr{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def run_pass(paths: list[Path], spec: PreprocessingSpec | None) -> float:
    """Read and decode every file (and preprocess it when `spec` is given); return seconds."""
    started = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = decode(ds)
        if spec is not None:
            preprocess_frame(arr, ds, spec)
    return time.perf_counter() - started


def measure(paths: list[Path], spec: PreprocessingSpec, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` frames/s for decoding alone and decoding plus preprocessing."""
    run_pass(paths[:2], spec)  # warm up imports and caches
    decode_s = min(run_pass(paths, None) for _ in range(rounds))
    full_s = min(run_pass(paths, spec) for _ in range(rounds))
    return {
        "frames": len(paths),
        "decode_frames_per_s": round(len(paths) / decode_s, 1),
        "decode_preprocess_frames_per_s": round(len(paths) / full_s, 1),
        "decode_ms_per_frame": round(1000 * decode_s / len(paths), 2),
        "preprocess_ms_per_frame": round(1000 * (full_s - decode_s) / len(paths), 2),
        "overhead_ratio": round(full_s / decode_s, 2),
    }


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cr", type=int, default=20, help="synthetic CR images")
    parser.add_argument("--slices", type=int, default=40, help="CT slices")
    parser.add_argument("--synth", type=int, default=40, help="dicom-ai synth CR studies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cr_spec = PreprocessingSpec(input_shape=(224, 224), channels=3)
    ct_spec = PreprocessingSpec(input_shape=(224, 224), channels=3, window="lung")
    with tempfile.TemporaryDirectory(prefix="dicom-ai-bench-") as tmp:
        work = Path(tmp)
        cr = make_cr_set(work / "cr", args.cr)
        ct = make_ct_series(work / "ct", args.slices, size=512)
        synthesize(work / "synth", studies=args.synth, seed=0, modality="CR")
        synth_cr = sorted((work / "synth").rglob("*.dcm"))
        results = {
            "cr_512_uint16_monochrome2": measure(cr, cr_spec, args.rounds),
            "ct_512_int16_lung_window": measure(ct, ct_spec, args.rounds),
            "synth_cr_mixed_codecs": measure(synth_cr, cr_spec, args.rounds),
        }

    report: dict[str, Any] = {
        "benchmark": "preprocess",
        "rounds": args.rounds,
        "spec": {"input_shape": [224, 224], "channels": 3, "normalization": "minmax",
                 "window": {"cr": "dataset (none: min/max)", "ct": "lung",
                            "synth_cr": "dataset"}},
        "measure": "files read from disk + decoded (+ preprocess_frame), best of rounds",
        "target_overhead_ratio": 1 + TARGET_OVERHEAD,
        "machine": {"cpus": os.cpu_count() or 0, "python": platform.python_version(),
                    "numpy": np.__version__, "pydicom": pydicom.__version__},
        "results": results,
        "meets_target": {name: r["overhead_ratio"] <= 1 + TARGET_OVERHEAD
                         for name, r in results.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    print()
    print("| set | frames | decode (frames/s) | decode + preprocess (frames/s) | "
          "decode ms/frame | preprocess ms/frame | overhead ratio | target <= 1.20 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        verdict = "met" if report["meets_target"][name] else "missed"
        print(f"| {name} | {r['frames']:.0f} | {r['decode_frames_per_s']:.1f} | "
              f"{r['decode_preprocess_frames_per_s']:.1f} | {r['decode_ms_per_frame']:.2f} | "
              f"{r['preprocess_ms_per_frame']:.2f} | {r['overhead_ratio']:.2f}x | {verdict} |")


if __name__ == "__main__":
    main()
