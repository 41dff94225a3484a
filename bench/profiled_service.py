"""The service under cProfile, for `python -m bench --profile`:

    python -m bench.profiled_service OUT.prof --config bench/out/<run>/<name>.ini

Runs `bootstrap.main` in this process and writes the profile when uvicorn stops (SIGTERM/SIGINT): the main
thread's (uvicorn, callback acknowledgements) to OUT.prof and the pipeline thread's to OUT.prof.pipeline.
cProfile counts CPU-bound Python work (roughly 2x slower while profiling); it attributes CPU better than a
wall-clock sampler on a 2-core machine, where every process is often waiting for a core.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from bench.whatif import apply

    apply(os.environ.get("BENCH_WHATIF", ""))  # python -m bench --profile --what-if ...
    import bootstrap  # ROOT is on PYTHONPATH (bench.common.clean_env)
    from adapters.inbound import pipeline_loop

    # The pipeline runs on its own thread (adapters/inbound/pipeline_loop.py): profile it too, and write
    # its profile next to the main thread's (OUT.pipeline); `pstats.Stats(OUT, OUT + ".pipeline")` adds them.
    run_pipeline = pipeline_loop.PipelineLoop._run

    def profiled_run(self: pipeline_loop.PipelineLoop) -> None:
        pipeline_profile = cProfile.Profile()
        pipeline_profile.enable()
        try:
            run_pipeline(self)
        finally:
            pipeline_profile.disable()
            pipeline_profile.dump_stats(out + ".pipeline")

    pipeline_loop.PipelineLoop._run = profiled_run  # type: ignore[method-assign]

    # uvicorn captures SIGTERM, shuts down gracefully, then re-raises it: exit through SystemExit so the
    # profile is written.
    signal.signal(signal.SIGTERM, _exit)
    profile = cProfile.Profile()
    profile.enable()
    try:
        bootstrap.main(argv)
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
