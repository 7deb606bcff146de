"""Imaging: what the upload check and an on-the-fly de-identified copy cost per DICOM instance.

Baseline, measured in the same run and alternated with the others: ``pydicom.dcmread`` of the
file, the least any DICOM-aware path does. Then ``parse_dicom`` (the upload check: every element
decoded, deflate bombs refused) and ``DicomDeidentifier.deidentify`` (what a consultation
participant outside the care relationship triggers per download: parse, PS3.15 profile, UID
remapping, date shift, rewrite). Files: pydicom's bundled MR series, CT and ultrasound images.
Prints the median per instance and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import io
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pydicom.data

from medcollab.deid.dicom import DicomDeidentifier, parse_dicom

_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _corpus() -> list[bytes]:
    paths = sorted((_FILES / "dicomdirtests" / "98892003" / "MR700").iterdir())
    paths += [_FILES / "CT_small.dcm", _FILES / "MR_small.dcm", _FILES / "examples_rgb_color.dcm"]
    return [p.read_bytes() for p in paths]


def _time(action: Callable[[bytes], object], files: list[bytes]) -> float:
    """Seconds per instance over one pass of the corpus."""
    started = time.perf_counter()
    for data in files:
        action(data)
    return (time.perf_counter() - started) / len(files)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds: a smoke run")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 30
    files = _corpus()
    deidentifier = DicomDeidentifier(key=secrets.token_bytes(32), date_shift_days=-400)
    actions: dict[str, Callable[[bytes], object]] = {
        "dcmread (baseline)": lambda data: pydicom.dcmread(io.BytesIO(data)),
        "parse_dicom (upload check)": parse_dicom,
        "deidentify (shared copy)": deidentifier.deidentify,
    }
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(rounds):
        for name, action in actions.items():  # Alternating, so drift hits every line alike.
            samples[name].append(_time(action, files))
    baseline = statistics.median(samples["dcmread (baseline)"])
    size = sum(len(f) for f in files) / len(files)
    print(f"Imaging: {len(files)} DICOM instances (mean {size / 1024:.0f} KiB), {rounds} rounds")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:28} {median * 1000:8.3f} ms/instance  {median / baseline:6.2f}x baseline")


if __name__ == "__main__":
    main()
