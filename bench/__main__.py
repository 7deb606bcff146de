"""``python -m bench``: every benchmark in sequence, then a summary (``make bench``).

Options: ``--quick`` (3 s per load line, a few bundles: a smoke run, not a measurement; passed on to
the other benchmarks whose ``main()`` takes it), ``--only NAME`` (``fhir_read``, ``import``,
``audit``, ``fhir_validation``, ``imaging``; repeatable). The results are also written as JSON to
``$MEDCOLLAB_BENCH_RESULTS`` (default ``<tmp>/medcollab-bench/latest.json``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bench import fhir_read_bench, import_bench

#: Benchmarks that other modules provide with a ``main()``; run when present.
EXTERNAL: Final = {
    "audit": "bench.audit_bench",
    "fhir_validation": "bench.fhir_validation_bench",
    "imaging": "bench.imaging_bench",
}
NAMES: Final = ("fhir_read", "import", *EXTERNAL)


def _results_path() -> Path:
    configured = os.environ.get("MEDCOLLAB_BENCH_RESULTS")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "medcollab-bench" / "latest.json"


def _run_fhir_read(quick: bool) -> tuple[dict[str, Any], str]:
    config = (
        fhir_read_bench.ReadBenchConfig(
            seconds=3, rounds=1, profile_iterations=300, profile_budget=5
        )
        if quick
        else fhir_read_bench.ReadBenchConfig()
    )
    result = fhir_read_bench.run(config)
    fhir_read_bench.report(result)
    secured, baseline = result.line("secured"), result.line("baseline")
    summary = "no result"
    if secured and baseline and result.ratio is not None:
        summary = (
            f"secured {secured.requests_per_second:.0f} req/s vs baseline "
            f"{baseline.requests_per_second:.0f} req/s = {result.ratio:.3f}x"
        )
    if result.audit_ratio is not None and result.audit_cost_percent is not None:
        summary += (
            f"; audit on/off {result.audit_ratio:.3f}x "
            f"(audit costs {result.audit_cost_percent:.1f}% of read throughput)"
        )
    return result.to_json(), summary


def _run_import(quick: bool) -> tuple[dict[str, Any], str]:
    result = import_bench.run(max_files=3 if quick else None)
    import_bench.report(result)
    ratio = f" = {result.ratio:.3f}x baseline" if result.ratio is not None else ""
    summary = (
        f"{result.rate:.0f} resources/s ({result.resources} in {result.seconds:.1f} s){ratio}"
        + (f", {len(result.failed)} files failed" if result.failed else "")
    )
    return result.to_json(), summary


def _run_external(module_name: str, quick: bool) -> tuple[dict[str, Any], str]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return {"skipped": "not present"}, f"skipped: {module_name} is not present"
    entry: Callable[..., Any] = module.main
    # Their own defaults, never this command's arguments; --quick only where their parser has it.
    argv = ["--quick"] if quick and '"--quick"' in inspect.getsource(module) else []
    arguments: list[list[str]] = [argv] if inspect.signature(entry).parameters else []
    started = time.perf_counter()
    try:
        entry(*arguments)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise RuntimeError(f"{module_name} exited with status {exc.code}") from None
    return {"seconds": time.perf_counter() - started}, "ran (see its output above)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 3 s smoke run of each benchmark")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME", default=None)
    args = parser.parse_args(argv)
    selected = [name for name in NAMES if args.only is None or name in args.only]
    fhir_read_bench.unwind_on_signals()

    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "benchmarks": {},
    }
    summaries: list[tuple[str, str]] = []
    failed = False
    for name in selected:
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        started = time.perf_counter()
        try:
            if name == "fhir_read":
                data, summary = _run_fhir_read(args.quick)
            elif name == "import":
                data, summary = _run_import(args.quick)
            else:
                data, summary = _run_external(EXTERNAL[name], args.quick)
        except KeyboardInterrupt:
            print("\ninterrupted; servers and temporary folders were cleaned up", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others.
            traceback.print_exc()
            data, summary = {"error": f"{type(exc).__name__}: {exc}"}, f"FAILED: {exc}"
            failed = True
        data["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["benchmarks"][name] = data
        summaries.append((name, summary))

    print("\n=== summary " + "=" * 53)
    for name, summary in summaries:
        print(f"  {name:16}{summary}")
    path = _results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"  results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
