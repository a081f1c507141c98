"""Run one fuzz target under atheris (libFuzzer), with our modules instrumented.

    python tests/fuzz/fuzz_runner.py <target> [libFuzzer flags] [corpus dirs]
    python tests/fuzz/fuzz_runner.py <target> --replay FILE...   # run inputs once, no fuzzing

Targets: ``peer``, ``manifest``, ``state_meta`` (fuzz_targets.py),
``service`` (fuzz_service.py). Typical flags: ``-max_total_time=600 -timeout=60
-rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=DIR/``; a crash is written to
``<artifact_prefix>crash-<sha1>`` (a hang to ``timeout-<sha1>``) and the exit status is
non-zero. ``tests/fuzz/test_fuzz.py`` drives this as a subprocess, one target at a time.

The snapshotd, snapshotd_client and google.protobuf Python modules are imported inside
``atheris.instrument_imports`` so their branches guide the search; the modules a target
needs are imported on its first input, after instrumentation.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

INSTRUMENTED = ("snapshotd", "snapshotd_client")


def target(name: str):
    import fuzz_service
    import fuzz_targets

    targets = {**fuzz_targets.TARGETS, **fuzz_service.TARGETS}
    if name not in targets:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(sorted(targets))}")
    return targets[name]


def warm(name: str, fn) -> None:
    """Import (and so instrument) everything the target touches, before the first input."""
    import fuzz_targets

    fuzz_targets.prepare(name)
    try:
        fn(b"")
    except Exception:
        pass


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    name = argv[1]
    if len(argv) > 2 and argv[2] == "--replay":
        fn = target(name)
        for path in argv[3:]:
            with open(path, "rb") as f:
                fn(f.read())
            print("ok", path)
        return
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        fn = target(name)
        warm(name, fn)
    atheris.Setup([argv[0]] + argv[2:], fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
