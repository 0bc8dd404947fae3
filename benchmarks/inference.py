"""Inference speed: our runtime vs bare Keras calls of the same model, in the same run.

For each model (the bundled ones by default, or ``--model FOLDER``...): images/s at batch 1 and
batch 32 through :func:`dicom_ai.inference.runtime.load_predictor` (Keras: a ``tf.function`` with a
fixed input signature; ONNX: ONNX Runtime), through a bare eager call ``model(x,
training=False)`` and through ``model.predict(x)``; the ratio of our runtime to the faster bare
Keras call (target >= 0.95). Also the load time (read + compile + one warm-up call) and the
latency of the first real call after load. Best of ``--rounds``; random inputs of the model's
input shape (speed does not depend on content).

Run: ``.venv/bin/python -m benchmarks.inference [--model DIR ...] [--rounds 3] [--out FILE]``.
Prints a JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_RATIO = 0.95


def throughput(call: Callable[[Any], Any], x: Any, *, seconds: float, rounds: int) -> float:
    """Best-of-`rounds` images/s of `call(x)`, each round running for about `seconds`."""
    call(x)  # warm
    best = 0.0
    for _ in range(rounds):
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            call(x)
            done += len(x)
        best = max(best, done / (time.perf_counter() - started))
    return best


def measure(folder: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """Every figure for one model folder."""
    import keras

    from dicom_ai.inference.runtime import load_predictor

    started = time.perf_counter()
    predictor = load_predictor(folder)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    one = rng.random((1, *predictor.spec.input_shape), dtype=np.float32)
    started = time.perf_counter()
    predictor.predict(one)
    first_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "model": f"{predictor.spec.name} {predictor.spec.version}",
        "backend": predictor.backend,
        "input_shape": list(predictor.spec.input_shape),
        "load_seconds": round(load_s, 3),
        "first_inference_ms": round(1000 * first_s, 2),
    }
    bare = (keras.saving.load_model(folder / predictor.spec.network, compile=False)
            if predictor.backend == "keras" else None)
    for size in (1, 32):
        x = rng.random((size, *predictor.spec.input_shape), dtype=np.float32)
        ours = throughput(predictor.predict, x, seconds=seconds, rounds=rounds)
        row: dict[str, float] = {"runtime": round(ours, 1)}
        if bare is not None:
            eager = throughput(lambda b: bare(b, training=False), x, seconds=seconds,
                               rounds=rounds)
            predict = throughput(lambda b: bare.predict(b, batch_size=len(b), verbose=0), x,
                                 seconds=seconds, rounds=rounds)
            row.update({"keras_call": round(eager, 1), "keras_predict": round(predict, 1),
                        "ratio_vs_best_bare": round(ours / max(eager, predict), 2)})
        result[f"batch_{size}_images_per_s"] = row
    return result


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="model folder (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from dicom_ai.inference.registry import BUNDLED_ROOT, Registry

    folders = args.model or [e.path for e in Registry(BUNDLED_ROOT.parent / "none",
                                                      bundled_root=BUNDLED_ROOT).entries()]
    results = [measure(folder, args.rounds, args.seconds) for folder in folders]
    report = {
        "benchmark": "inference",
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "target_ratio": TARGET_RATIO,
        "machine": {"cpus": os.cpu_count() or 0, "python": platform.python_version()},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print()
    print("| model | backend | batch | runtime (img/s) | model(x) (img/s) | predict (img/s) | "
          "ratio | load s | first call ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for size in (1, 32):
            row = r[f"batch_{size}_images_per_s"]
            print(f"| {r['model']} | {r['backend']} | {size} | {row['runtime']:.1f} | "
                  f"{row.get('keras_call', float('nan')):.1f} | "
                  f"{row.get('keras_predict', float('nan')):.1f} | "
                  f"{row.get('ratio_vs_best_bare', float('nan')):.2f}x | "
                  f"{r['load_seconds']:.2f} | {r['first_inference_ms']:.1f} |")


if __name__ == "__main__":
    main()
