"""Load generator process: floods one URL with pre-built signed WeCom callbacks over keep-alive connections.

    python -m bench.loadgen --port P --connections 64 --duration 2 --warmup 0.5     # timed run
    python -m bench.loadgen --port P --connections 64 --requests 3000               # burst of N callbacks
    python -m bench.loadgen --port P --connections 64 --duration 2 --rate 500        # paced: 500 req/s in all

Prints one JSON object: requests/s and latency percentiles over the measured window (after the warm-up),
status counts, and this process's own CPU use (to show the client is not the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from bench.common import HOST, KF, self_cpu_seconds
from bench.rawhttp import RawConnection, callback_pool


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def timed(args: argparse.Namespace, pool: list[bytes]) -> dict[str, Any]:
    connections = await asyncio.gather(
        *(RawConnection(HOST, args.port).connect() for _ in range(args.connections))
    )
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    total = 0
    started = time.perf_counter()
    window_start = started + args.warmup
    window_end = window_start + args.duration

    # Paced mode: each connection sends every `interval` seconds (staggered), far below saturation, so the
    # latency is the server's own rather than time spent queued behind the other connections.
    interval = args.connections / args.rate if args.rate else 0.0

    async def worker(conn: RawConnection, offset: int) -> None:
        nonlocal errors, total
        index = offset
        next_at = started + interval * offset / args.connections
        while True:
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            sent_at = time.perf_counter()
            if sent_at >= window_end:
                return
            request = pool[index % len(pool)]
            index += args.connections
            try:
                status, _ = await conn.request(request, retry=False)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                await conn.close()
                continue
            done = time.perf_counter()
            total += 1
            if window_start <= done <= window_end:
                latencies.append(done - sent_at)
                statuses[status] += 1

    cpu_before = self_cpu_seconds()
    await asyncio.gather(*(worker(c, i) for i, c in enumerate(connections)))
    cpu = self_cpu_seconds() - cpu_before
    wall = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in connections))
    latencies.sort()
    return {
        "requests": len(latencies),
        "total_requests": total,
        "rps": len(latencies) / args.duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
        "client_cpu_pct": 100 * cpu / wall if wall else 0.0,
    }


async def burst(args: argparse.Namespace, pool: list[bytes]) -> dict[str, Any]:
    connections = await asyncio.gather(
        *(RawConnection(HOST, args.port).connect() for _ in range(args.connections))
    )
    statuses: Counter[int] = Counter()
    errors = 0
    next_index = 0

    async def worker(conn: RawConnection) -> None:
        nonlocal next_index, errors
        while next_index < args.requests:
            request = pool[next_index % len(pool)]
            next_index += 1
            try:
                status, _ = await conn.request(request, retry=False)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                await conn.close()
                continue
            statuses[status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in connections))
    return {
        "requests": sum(statuses.values()),
        "elapsed_s": elapsed,
        "rps": sum(statuses.values()) / elapsed if elapsed else 0.0,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds (timed mode)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first (timed mode)")
    parser.add_argument("--requests", type=int, default=0, help="burst mode: send exactly this many")
    parser.add_argument("--rate", type=float, default=0.0, help="timed mode: total requests/s (0 = flat out)")
    parser.add_argument("--pool", type=int, default=4096, help="distinct signed callbacks to cycle through")
    parser.add_argument("--kf", default=KF, help="the kf account every callback names")
    parser.add_argument("--seed", default="n", help="nonce prefix (distinct per run)")
    args = parser.parse_args(argv)
    size = min(args.pool, args.requests) if args.requests else args.pool
    pool = callback_pool(args.port, size, [args.kf], seed=args.seed)
    result = asyncio.run(burst(args, pool) if args.requests else timed(args, pool))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
