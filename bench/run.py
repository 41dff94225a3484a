"""The benchmark orchestrator: `python -m bench [--quick | --full] [--only SECTION ...] [--profile]`.

Processes (all on 127.0.0.1):
- this process: the orchestrator, the fake WeCom API (tests.support FakeWeComServer, in a uvicorn thread)
  and the pipeline/concurrency drivers (they seed WeCom's message log and post the matching callbacks);
- the service: `python bootstrap.py --config bench/out/<run>.ini`, LOG_LEVEL = WARNING;
- the baseline: `python -m bench.baseline_app` (bare Starlette, same uvicorn settings);
- the fake Dify: `python -m bench.fake_dify` (bare ASGI, streams a fixed answer, optional delay);
- the load generator: `python -m bench.loadgen` (raw-socket keep-alive client), one process per run;
- memcached (/usr/bin/memcached) for the Memcached rows.

Prints the tables and writes bench/RESULTS.md (or --results PATH). Logs and configs go to bench/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from application.options import ReplyTexts
from bench.common import (
    ADMIN_TOKEN,
    AES_KEY,
    CORP_ID,
    CORP_SECRET,
    DIFY_KEY,
    HOST,
    KF,
    OUT,
    ROOT,
    TOKEN,
    Memcached,
    Proc,
    clean_env,
    free_port,
    http_get,
    http_post_json,
    machine_info,
    python_proc,
    self_cpu_seconds,
    write_ini,
)
from bench.fake_dify import LONG_ANSWER
from bench.loadgen import percentile
from bench.rawhttp import RawConnection, callback_request, crypto
from bench.whatif import PATCHES
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer

DIFY_CONCURRENCY = 400  # [BOT] DIFY_CONCURRENCY for every service run: above the 300 concurrent customers
SECTIONS = ("crypto", "webhook", "pipeline", "concurrency", "progressive", "burst")
_REPLY = re.compile(r"\br(\d+)-m(\d+)\b")


@dataclass(frozen=True)
class Budget:
    name: str
    concurrency_levels: tuple[int, ...]
    webhook_seconds: float
    webhook_warmup: float
    webhook_rounds: int
    flood_callbacks: int
    pipeline_customers: int
    pipeline_turns: int
    pipeline_runs: int
    concurrency_customers: int
    concurrency_runs: int
    dify_delay_s: float
    crypto_seconds: float
    crypto_rounds: int
    pipeline_connections: int = 8
    drive_timeout_s: float = 120.0
    stall_s: float = 10.0  # a run stops when no reply came for this long


QUICK = Budget(
    name="quick",
    concurrency_levels=(1, 16, 64, 256),
    webhook_seconds=2.0,
    webhook_warmup=0.5,
    webhook_rounds=2,
    flood_callbacks=3000,
    pipeline_customers=100,
    pipeline_turns=10,
    pipeline_runs=3,
    concurrency_customers=300,
    concurrency_runs=1,
    dify_delay_s=2.0,
    crypto_seconds=0.3,
    crypto_rounds=3,
)
FULL = Budget(
    name="full",
    concurrency_levels=(1, 16, 64, 256),
    webhook_seconds=5.0,
    webhook_warmup=1.0,
    webhook_rounds=3,
    flood_callbacks=10000,
    pipeline_customers=500,
    pipeline_turns=10,
    pipeline_runs=3,
    concurrency_customers=300,
    concurrency_runs=3,
    dify_delay_s=2.0,
    crypto_seconds=1.0,
    crypto_rounds=5,
    drive_timeout_s=300.0,
    stall_s=30.0,  # 500 customers at once: the first replies take over 10 s with Memcached
)

# Targets (2 cores).
WEBHOOK_RATIO_MIN = 0.8
WEBHOOK_P99_MS_AT_64 = 10.0
FLOOD_SYNC_MAX = 10  # "a handful" of sync_msg calls for the whole flood
PIPELINE_CPU_MS_MAX = 2.0
CONCURRENCY_MAX_S = 3.0
# Bursts at the service's defaults (issue #14): all answered within these many seconds.
BURST_300_MAX_S = 3.0
BURST_1000_MAX_S = 5.0
BURST_CAPACITY_FACTOR = 1.3  # × the ideal (customers / capacity × Dify delay)
BURST_ACK_P99_MS = 100.0
BURST_SPLIT = (35.0, 65.0)  # % of the burst each of two instances answers
PEAK_RSS_MIB_MAX = 150.0
GROWTH_MIB_MAX = 2.0  # per 1,000 messages: RSS after the last pipeline run minus after the one before
MEMCACHED_COMMANDS = (
    "cmd_get",
    "cmd_set",
    "cmd_touch",
    "cmd_flush",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "delete_hits",
    "delete_misses",
)  # cas and add count as cmd_set
PROGRESSIVE_STREAM_S = 10.0  # the 6 KB answer streams evenly over this long
PROGRESSIVE_FIRST_MAX_S = 4.5  # target: the customer reads the first part by then
PACED_RATE = 500.0  # requests/s in all for the paced webhook run (about 1/4 of the service's capacity here)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the bench ---------------------------------------------------------------------------------------------


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    budget: str = ""
    started: str = ""
    duration_s: float = 0.0
    crypto: dict[str, Any] = field(default_factory=dict)
    webhook: list[dict[str, Any]] = field(default_factory=list)
    flood: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    concurrency: list[dict[str, Any]] = field(default_factory=list)
    burst: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    profiled: bool = False
    what_if: list[str] = field(default_factory=list)
    progressive: list[dict[str, Any]] = field(default_factory=list)


class Bench:
    def __init__(self, budget: Budget, *, profile: bool, what_if: list[str]) -> None:
        self.budget = budget
        self.profile = profile
        self.what_if = what_if
        self.results = Results(budget=budget.name, profiled=profile, what_if=what_if)
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.out = OUT / self.run_id
        self.out.mkdir(parents=True, exist_ok=True)
        self._dify: Proc | None = None
        self._memcached: Memcached | None = None

    # --- shared processes -----------------------------------------------------------------------------

    @property
    def dify(self) -> Proc:
        if self._dify is None:
            port = free_port()
            self._dify = python_proc(
                "fake-dify",
                ["-m", "bench.fake_dify", "--port", str(port)],
                port=port,
                ready_path="/healthz",
                log_dir=self.out,
            ).start()
        return self._dify

    def dify_config(self, **config: float) -> dict[str, Any]:
        return http_post_json(self.dify.url + "/_bench/config", dict(config))

    def dify_stats(self, reset: bool = False) -> dict[str, Any]:
        if reset:
            return http_post_json(self.dify.url + "/_bench/reset", {})
        _, body = http_get(self.dify.url + "/_bench/stats")
        stats: dict[str, Any] = json.loads(body)
        return stats

    @property
    def memcached(self) -> Memcached:
        if self._memcached is None:
            self._memcached = Memcached.start()
        return self._memcached

    def close(self) -> None:
        if self._dify is not None:
            self._dify.stop()
        if self._memcached is not None:
            self._memcached.stop()

    def start_service(
        self, name: str, wecom_url: str, store: str, *, defaults: bool = False, memcached_prefix: str = ""
    ) -> Proc:
        """`defaults`: the service's own defaults (no LOG_LEVEL, no [BOT] settings), as an operator who
        changed nothing runs it; only what must be configured (credentials, addresses) is set."""
        port = free_port()
        sections: dict[str, dict[str, Any]] = {
            "CONFIG": {
                "CORP_ID": CORP_ID,
                "CORP_SECRET": CORP_SECRET,
                "TOKEN": TOKEN,
                "ENCODING_AES_KEY": AES_KEY,
                "DIFY_API_BASE": self.dify.url + "/v1",
                "DIFY_API_KEY": DIFY_KEY,
                "WECOM_API_BASE": wecom_url,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "LOG_LEVEL": "WARNING",
            },
            "SERVER": {"HOST": HOST, "PORT": port, "SHUTDOWN_GRACE": 5},
            "BOT": {"DIFY_CONCURRENCY": DIFY_CONCURRENCY, "RECOVERY_INTERVAL": 0},
        }
        if defaults:
            del sections["CONFIG"]["LOG_LEVEL"], sections["BOT"]
        if store == "memcached":
            sections["MEMCACHE"] = {
                "servers": self.memcached.address,
                "prefix": memcached_prefix or f"bench{uuid.uuid4().hex[:8]}",
            }
            if not defaults:
                sections["MEMCACHE"] |= {"connect_timeout": 2, "timeout": 2}
        config = write_ini(self.out / f"{name}.ini", sections)
        command = [str(ROOT / "bootstrap.py"), "--config", str(config)]
        if self.profile:
            command = ["-m", "bench.profiled_service", str(self.out / f"{name}.prof"), *command[1:]]
        elif self.what_if:
            command = ["-m", "bench.whatif", ",".join(self.what_if), *command[1:]]
        proc = python_proc(
            name,
            command,
            env={
                "BENCH_WHATIF": ",".join(self.what_if),
                "BENCH_DIFY_CONCURRENCY": "1000" if defaults else str(DIFY_CONCURRENCY),
            },
            port=port,
            ready_path="/readyz",
            log_dir=self.out,
        )
        return proc.start()

    def status(self, service: Proc) -> dict[str, Any]:
        code, body = http_get(service.url + "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if code != 200:
            raise RuntimeError(f"/status answered {code}")
        data: dict[str, Any] = json.loads(body)
        return data

    def stop_service(self, service: Proc) -> None:
        """Stop a service; with --profile, summarize its cProfile output."""
        service.stop()
        prof = self.out / f"{service.name}.prof"
        if self.profile and prof.exists():
            summary = self.out / f"profile-{service.name}.md"
            summary.write_text(summarize_profile(prof, service.name), encoding="utf-8")
            self.results.profiles.append(str(summary.relative_to(ROOT)))

    # --- 5. crypto ---------------------------------------------------------------------------------------

    def run_crypto(self) -> None:
        log("crypto: decrypt_callback + parse_notice vs raw AES-CBC")
        b = self.budget
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.crypto_bench",
                "--seconds",
                str(b.crypto_seconds),
                "--rounds",
                str(b.crypto_rounds),
            ],
            cwd=ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        self.results.crypto = json.loads(result.stdout.strip().splitlines()[-1])

    # --- 1. webhook ---------------------------------------------------------------------------------------

    def run_webhook(self) -> None:
        b = self.budget
        with fake_wecom() as (wecom, wecom_url):
            service = self.start_service("webhook-service", wecom_url, "memory")
            port = free_port()
            baseline = python_proc(
                "webhook-baseline",
                ["-m", "bench.baseline_app", "--port", str(port)],
                port=port,
                ready_path="/healthz",
                log_dir=self.out,
            ).start()
            try:
                for connections in b.concurrency_levels:
                    for round_ in range(b.webhook_rounds):
                        # A/B/A/B: service, then baseline, in every round.
                        for target, kind in ((service, "service"), (baseline, "baseline")):
                            row = self._webhook_run(target, kind, connections, round_, wecom)
                            self.results.webhook.append(row)
                            log(
                                f"webhook {kind:8s} c={connections:3d} round {round_ + 1}: "
                                f"{row['rps']:7.0f} req/s p50 {row['p50_ms']:.2f} ms "
                                f"p99 {row['p99_ms']:.2f} ms"
                                + (f" sync_msg {row['sync_calls']}" if kind == "service" else "")
                            )
                # Latency at a fixed offered load: 64 connections sending PACED_RATE requests/s in all.
                for round_ in range(b.webhook_rounds):
                    for target, kind in ((service, "service"), (baseline, "baseline")):
                        row = self._webhook_run(target, kind, 64, round_, wecom, rate=PACED_RATE)
                        self.results.webhook.append(row)
                        log(
                            f"webhook {kind:8s} c= 64 @ {PACED_RATE:g}/s round {round_ + 1}: "
                            f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms"
                        )
                self._flood(service, wecom)
                self._memory_row("webhook", "service", service, note="after all webhook runs and the flood")
                self._memory_row("webhook", "baseline", baseline, note="bare endpoint, same runs")
            finally:
                self.stop_service(service)
                baseline.stop()

    def _webhook_run(
        self,
        target: Proc,
        kind: str,
        connections: int,
        round_: int,
        wecom: FakeWeComServer,
        rate: float = 0.0,
    ) -> dict[str, Any]:
        b = self.budget
        sync_before = wecom.sync_calls
        cpu_before = target.cpu()
        started = time.perf_counter()
        result = loadgen(
            port=target.port,
            connections=connections,
            duration=b.webhook_seconds,
            warmup=b.webhook_warmup,
            rate=rate,
            seed=f"{kind[0]}{connections}r{round_}p{rate:g}x",
        )
        wall = time.perf_counter() - started
        cpu = target.cpu() - cpu_before
        settle_sync(wecom)
        bad = {k: v for k, v in result["statuses"].items() if k != "200"}
        if bad or result["errors"]:
            log(f"webhook {kind} c={connections}: non-200 answers {bad}, errors {result['errors']}")
        return {
            "kind": kind,
            "connections": connections,
            "rate": rate,
            "round": round_,
            **result,
            "server_cpu_us_per_req": 1e6 * cpu / max(result["total_requests"], 1),
            "server_cpu_pct": 100 * cpu / wall,
            "sync_calls": wecom.sync_calls - sync_before if kind == "service" else 0,
        }

    def _flood(self, service: Proc, wecom: FakeWeComServer) -> None:
        n = self.budget.flood_callbacks
        log(f"flood: {n} callbacks for one kf account, 64 connections, as fast as possible")
        settle_sync(wecom)
        before = self.status(service)["counters"]
        sync_before = wecom.sync_calls
        result = loadgen(port=service.port, connections=64, requests=n, pool=n, seed="flood")
        settle_sync(wecom, quiet_s=0.5)
        after = self.status(service)["counters"]
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("callbacks", "pulls", "pulls_coalesced")}
        self.results.flood = {
            "callbacks_sent": n,
            "acked_200": result["statuses"].get("200", 0),
            "elapsed_s": result["elapsed_s"],
            "rps": result["rps"],
            "sync_calls": wecom.sync_calls - sync_before,
            **delta,
        }
        log(f"flood: {self.results.flood}")

    # --- 2./4. pipeline ------------------------------------------------------------------------------------

    def run_pipeline(self, store: str) -> None:
        b = self.budget
        self.dify_config(delay=0.0)
        with fake_wecom() as (wecom, wecom_url):
            service = self.start_service(f"pipeline-{store}", wecom_url, store)
            try:
                idle = idle_cpu_rate(service)
                runs: list[dict[str, Any]] = []
                for run in range(b.pipeline_runs):
                    # New customers every run: [BOT] RATE_LIMIT (20 per 60 s per customer) stays default.
                    customers = [f"wmP{run}x{j:05d}" for j in range(b.pipeline_customers)]
                    mc_before = self.memcached.stats() if store == "memcached" else {}
                    row = self.drive(
                        service,
                        wecom,
                        run,
                        customers,
                        b.pipeline_turns,
                        b.pipeline_connections,
                        idle,
                        b.stall_s,
                    )
                    if mc_before:
                        mc_after = self.memcached.stats()
                        commands = sum(mc_after.get(k, 0) - mc_before.get(k, 0) for k in MEMCACHED_COMMANDS)
                        row["memcached_cmds"] = commands
                        row["memcached_cmds_per_msg"] = (
                            commands / row["answered"] if row["answered"] else None
                        )
                        row["memcached_cas_conflicts"] = mc_after.get("cas_badval", 0) - mc_before.get(
                            "cas_badval", 0
                        )
                    time.sleep(0.3)
                    row["rss_after_kib"] = service.memory()["VmRSS"]
                    runs.append(row)
                    log(
                        f"pipeline {store} run {run + 1}: {row['answered']}/{row['messages']} answered, "
                        f"{row['msgs_per_s']:.0f} msg/s, CPU {row['cpu_ms_per_msg']:.2f} ms/msg, "
                        f"RSS {row['rss_after_kib'] / 1024:.1f} MiB"
                    )
                self.results.pipeline[store] = runs
                self._memory_row(f"pipeline-{store}", "service", service, note=f"{b.pipeline_runs} runs")
            finally:
                self.stop_service(service)

    def run_pipelines(self) -> None:
        self.run_pipeline("memory")
        self.run_pipeline("memcached")

    # --- 3. concurrency ------------------------------------------------------------------------------------

    def run_concurrency(self) -> None:
        b = self.budget
        self.dify_config(delay=b.dify_delay_s)
        try:
            with fake_wecom() as (wecom, wecom_url):
                service = self.start_service("concurrency", wecom_url, "memory")
                try:
                    idle = idle_cpu_rate(service)
                    for run in range(b.concurrency_runs):
                        customers = [f"wmC{run}x{j:04d}" for j in range(b.concurrency_customers)]
                        stall_s = max(b.stall_s, 4 * b.dify_delay_s)
                        row = self.drive(service, wecom, 100 + run, customers, 1, 64, idle, stall_s)
                        row["dify_peak_streams"] = row["dify_peak"]
                        row["dify_delay_s"] = b.dify_delay_s
                        self.results.concurrency.append(row)
                        log(
                            f"concurrency run {run + 1}: {row['answered']}/{row['messages']} answered in "
                            f"{row['elapsed_s']:.2f} s (floor {b.dify_delay_s:.1f} s), "
                            f"Dify streams at once: {row['dify_peak_streams']}"
                        )
                    self._memory_row(
                        "concurrency", "service", service, note=f"{b.concurrency_customers} at once"
                    )
                finally:
                    self.stop_service(service)
        finally:
            self.dify_config(delay=0.0)

    # --- 6. bursts at the service's defaults -------------------------------------------------------------

    def run_burst(self) -> None:
        """Customers writing at once to a service that runs with its defaults (nothing tuned: no
        DIFY_CONCURRENCY, default LOG_LEVEL); the fakes' latency and capacity are the only knobs. Each row
        has its own service process, so its peak RSS is the row's."""
        b = self.budget
        delay = b.dify_delay_s
        rows: list[tuple[str, int, dict[str, float], bool, int]] = [
            # (row, customers, fake Dify config, ack load, instances)
            ("300 at once", 300, {"delay": delay}, False, 1),
            ("1,000 at once", 1000, {"delay": delay}, False, 1),
            ("300 at once, Dify capacity 40 (429 beyond)", 300, {"delay": delay, "capacity": 40}, False, 1),
            ("1,000 at once + 200 callbacks/s ack probe", 1000, {"delay": delay}, True, 1),
            ("1,000 at once, 2 instances, Memcached", 1000, {"delay": delay}, False, 2),
        ]
        wanted = {int(n) for n in os.environ.get("BENCH_BURST_ROWS", "").split(",") if n.strip()}
        for tag, (label, count, dify, ack, instances) in enumerate(rows, start=300):
            if wanted and tag - 300 + 1 not in wanted:
                continue  # BENCH_BURST_ROWS=2,3: only those rows (1-based), for quicker iterations
            self.dify_config(**({"delay": 0.0, "capacity": 0} | dify))
            try:
                row = self._burst_row(tag, label, count, ack=ack, instances=instances)
            finally:
                self.dify_config(delay=0.0, capacity=0)
            row |= {"row": label, "dify_delay_s": dify["delay"], "capacity": int(dify.get("capacity", 0))}
            row["ideal_s"] = row["capacity"] and count / row["capacity"] * dify["delay"] or dify["delay"]
            self.results.burst.append(row)
            log(
                f"burst {label}: {row['answered']}/{row['messages']} answered in {row['elapsed_s']:.2f} s "
                f"(ideal {row['ideal_s']:g} s), fallbacks {row['fallback_texts']}, interims "
                f"{row['interim_texts']}, Dify 429s {row['dify_rejected']}, peak RSS "
                f"{max(row['peak_rss_kib']) / 1024:.1f} MiB"
                + (f", ack p50/p99 {row['ack']['p50_ms']:.1f}/{row['ack']['p99_ms']:.1f} ms" if ack else "")
                + (f", split {row['split']}" if instances > 1 else "")
            )

    def _burst_row(self, tag: int, label: str, count: int, *, ack: bool, instances: int) -> dict[str, Any]:
        store = "memcached" if instances > 1 else "memory"
        prefix = f"burst{uuid.uuid4().hex[:8]}"
        with fake_wecom() as (wecom, wecom_url):
            services = [
                self.start_service(
                    f"burst{tag}-{n}", wecom_url, store, defaults=True, memcached_prefix=prefix
                )
                for n in range(instances)
            ]
            try:
                idle = sum(idle_cpu_rate(s, 0.5) for s in services)
                before = [self.status(s)["counters"] for s in services]
                customers = [f"wmB{tag}x{j:04d}" for j in range(count)]
                probe: subprocess.Popen[str] | None = None
                if ack:
                    probe = start_loadgen(
                        port=services[0].port,
                        connections=16,
                        duration=8.0,
                        warmup=0.3,
                        rate=200.0,
                        seed=f"ack{tag}",
                    )
                    time.sleep(0.3)  # the probe's warm-up: the burst starts as its measured window does
                try:
                    row = self.drive(
                        services[0],
                        wecom,
                        tag,
                        customers,
                        1,
                        64,
                        idle,
                        stall_s=60.0,
                        ports=[s.port for s in services],
                    )
                finally:
                    if probe is not None:
                        row_ack = finish_loadgen(probe)
                if probe is not None:
                    row["ack"] = {k: row_ack[k] for k in ("p50_ms", "p99_ms", "rps", "requests")}
                    row["ack"]["non_200"] = sum(n for code, n in row_ack["statuses"].items() if code != "200")
                time.sleep(0.3)
                after = [self.status(s) for s in services]
                pairs = zip(after, before, strict=True)
                answered = [a["counters"].get("answered", 0) - b_.get("answered", 0) for a, b_ in pairs]
                row["answered_by_instance"] = answered
                total = sum(answered) or 1
                row["split"] = " / ".join(f"{100 * n / total:.0f} %" for n in answered)
                row["dify_apps"] = [a.get("dify_apps", {}) for a in after]
                row["peak_rss_kib"] = [s.memory()["VmHWM"] for s in services]
                for n, s in enumerate(services):
                    self._memory_row(
                        f"burst {label}",
                        f"service {n + 1}" if instances > 1 else "service",
                        s,
                        note="defaults",
                    )
                return row
            finally:
                for s in services:
                    self.stop_service(s)

    # --- the driver: messages in, replies out --------------------------------------------------------------

    # --- 6. progressive replies -----------------------------------------------------------------------------

    def run_progressive(self) -> None:
        """A 6 KB answer streamed evenly over 10 s: when its first and last parts reach the customer, sent
        progressively (moderation off) and whole (moderation on: today's behaviour). One service per mode:
        each reads the app's /parameters once and keeps them."""
        log("progressive: a 6 KB answer streamed over 10 s, parts sent as they complete vs whole")
        with fake_wecom() as (wecom, wecom_url):
            for mode, moderation in (("progressive", False), ("whole (moderation on)", True)):
                long_answer = {"answer": "long", "stream_s": PROGRESSIVE_STREAM_S, "chunk": 20}
                http_post_json(self.dify.url + "/_bench/config", {**long_answer, "moderation": moderation})
                service = self.start_service(f"progressive-{int(moderation)}", wecom_url, "memory")
                try:
                    row = asyncio.run(_progressive_turn(wecom, service.port, f"wmProg{int(moderation)}"))
                    row["mode"] = mode
                    self.results.progressive.append(row)
                    log(
                        f"progressive {mode}: first part after {row['first_s']:.2f} s, last after "
                        f"{row['last_s']:.2f} s, {row['parts']} messages"
                    )
                finally:
                    self.stop_service(service)
            short = {"answer": "short", "stream_s": 0, "chunk": 4, "moderation": False}
            http_post_json(self.dify.url + "/_bench/config", short)

    def drive(
        self,
        service: Proc,
        wecom: FakeWeComServer,
        tag: int,
        customers: list[str],
        turns: int,
        connections: int,
        idle_cpu_per_s: float,
        stall_s: float = 10.0,
        ports: list[int] | None = None,
    ) -> dict[str, Any]:
        """Every customer writes `turns` messages, each after the reply to the previous one (see `_drive`);
        callbacks go over `connections` keep-alive connections. CPU is the service's, from the first message
        until 0.3 s after the last reply, less its idle rate. A run stops early when no reply came for
        `stall_s` (a stuck message): then CPU is counted until the last reply."""
        dify_before = self.dify.cpu()
        self.dify_stats(reset=True)
        sync_before = wecom.sync_calls
        self_before = self_cpu_seconds()
        cpu_before = service.cpu()
        started = time.perf_counter()
        stats = asyncio.run(
            _drive(
                wecom,
                ports or service.port,
                tag,
                customers,
                turns,
                connections,
                self.budget.drive_timeout_s,
                stall_s,
                service.cpu,
            )
        )
        # CPU until the last reply (+0.3 s for the done marks), not through a stall's idle wait.
        ended = started + stats["elapsed_s"] + 0.3
        time.sleep(max(ended - time.perf_counter(), 0.0))
        cpu_end = service.cpu() if not stats["stalled"] else stats["service_cpu_at_last_reply"]
        wall = (time.perf_counter() if not stats["stalled"] else ended) - started
        cpu = cpu_end - cpu_before - idle_cpu_per_s * wall
        answered = stats["answered"]
        return {
            "customers": len(customers),
            "turns": turns,
            **stats,
            "sync_calls": wecom.sync_calls - sync_before,
            **{
                f"dify_{k}": v
                for k, v in self.dify_stats().items()
                if k in ("requests", "connections", "peak", "rejected")
            },
            "cpu_ms_per_msg": 1000 * max(cpu, 0.0) / answered if answered else float("nan"),
            "stall_s": stall_s,
            "service_cpu_pct": 100 * (cpu_end - cpu_before) / wall,
            "fakes_cpu_pct": 100 * (self_cpu_seconds() - self_before + self.dify.cpu() - dify_before) / wall,
        }

    def _memory_row(self, run: str, kind: str, proc: Proc, note: str) -> None:
        mem = proc.memory()
        self.results.memory.append(
            {"run": run, "process": kind, "peak_kib": mem["VmHWM"], "rss_kib": mem["VmRSS"], "note": note}
        )


async def _drive(
    wecom: FakeWeComServer,
    port: int | list[int],
    tag: int,
    customers: list[str],
    turns: int,
    connections: int,
    timeout: float,
    stall_s: float,
    cpu_probe: Callable[[], float],
) -> dict[str, Any]:
    """Every customer holds a conversation of `turns` messages: write (add the message to WeCom's log and
    post its callback), wait for the reply, write again. WeCom allows 5 replies per customer message
    window, so a customer never has more than one message waiting, as in real chats."""
    world = wecom.world
    c = crypto()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[tuple[RawConnection, int]] = asyncio.Queue()
    ports = port if isinstance(port, list) else [port]
    for n in range(max(1, min(connections, len(customers)))):
        target = ports[n % len(ports)]  # several instances: the connections alternate between them
        pool.put_nowait((await RawConnection(HOST, target).connect(), target))
    sent_at: dict[int, float] = {}
    replied_at: dict[int, float] = {}
    waiters: dict[int, asyncio.Future[bool]] = {}
    messages = len(customers) * turns
    rejected = 0
    other_replies = 0
    other_texts: dict[str, int] = {}
    duplicates = 0
    stalled = False
    seen = len(world.sent)
    started = time.perf_counter()
    deadline = started + timeout
    progress_at = started
    cpu_at_last_reply = cpu_probe()

    async def converse(j: int, customer: str) -> None:
        nonlocal rejected
        for turn in range(turns):
            i = turn * len(customers) + j
            waiters[i] = loop.create_future()
            world.add_customer_text(KF, customer, f"r{tag}-m{i}")
            sent_at[i] = time.perf_counter()
            conn, target = await pool.get()
            request = callback_request(
                c, port=target, open_kfid=KF, nonce=f"d{tag}-{i}", token=f"DT{tag}-{i}"
            )
            try:
                status, _ = await conn.request(request)
            finally:
                pool.put_nowait((conn, target))
            if status != 200:
                rejected += 1
            if not await waiters[i]:
                return  # the run stalled or timed out: this customer's conversation ends here

    async def watch() -> None:
        nonlocal seen, other_replies, stalled, progress_at, cpu_at_last_reply, duplicates
        while len(replied_at) < messages:
            await asyncio.sleep(0.002)
            sent = world.sent
            new, seen = sent[seen:], len(sent)
            now = time.perf_counter()
            if new:
                cpu_at_last_reply = cpu_probe()
            for reply in new:
                match = _REPLY.search(reply.text)
                if match and int(match.group(1)) == tag:
                    i = int(match.group(2))
                    duplicates += i in replied_at
                    replied_at.setdefault(i, now)
                    progress_at = now
                    waiter = waiters.get(i)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(True)
                else:
                    other_replies += 1
                    other_texts[reply.text] = other_texts.get(reply.text, 0) + 1
            if now - progress_at > stall_s or now > deadline:
                # No reply for stall_s: some message is stuck. Give up on the waiting customers.
                stalled = True
                for waiter in waiters.values():
                    if not waiter.done():
                        waiter.set_result(False)
                return

    await asyncio.gather(*(converse(j, name) for j, name in enumerate(customers)), watch())
    while not pool.empty():
        await pool.get_nowait()[0].close()
    last = max(replied_at.values()) if replied_at else time.perf_counter()
    latencies = sorted(replied_at[i] - sent_at[i] for i in replied_at)
    elapsed = last - started
    return {
        "messages": messages,
        "answered": len(replied_at),
        "stalled": stalled,
        "service_cpu_at_last_reply": cpu_at_last_reply,
        "unanswered_msgids": sorted(set(waiters) - set(replied_at))[:20],
        "rejected_callbacks": rejected,
        "other_replies": other_replies,
        "interim_texts": other_texts.get(ReplyTexts().interim, 0),
        "fallback_texts": other_texts.get(ReplyTexts().fallback, 0),
        "duplicate_answers": duplicates,
        "elapsed_s": elapsed,
        "msgs_per_s": len(replied_at) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
    }


async def _progressive_turn(wecom: FakeWeComServer, port: int, customer: str) -> dict[str, Any]:
    """One customer asks; the fake WeCom is watched (every 5 ms) for the answer's parts' arrival times (the
    interim text the service sends after 5 s is not a part of the answer)."""
    world = wecom.world
    interim = ReplyTexts().interim
    expected = len("".join(LONG_ANSWER.split()))
    world.add_customer_text(KF, customer, "请详细说明")
    conn = await RawConnection(HOST, port).connect()
    started = time.perf_counter()
    await conn.request(callback_request(crypto(), port=port, open_kfid=KF, nonce="prog", token="PROG"))
    arrivals: list[float] = []
    texts: list[str] = []
    deadline = started + 60
    while time.perf_counter() < deadline:
        sent = [s.text for s in world.sent if s.customer.external_userid == customer and s.text != interim]
        for _ in sent[len(texts) :]:
            arrivals.append(time.perf_counter() - started)
        texts = sent
        if len("".join("".join(texts).split())) >= expected:
            break
        await asyncio.sleep(0.005)
    return {
        "first_s": arrivals[0] if arrivals else float("nan"),
        "last_s": arrivals[-1] if arrivals else float("nan"),
        "parts": len(texts),
        "arrivals_s": arrivals,
        "complete": len("".join("".join(texts).split())) >= expected,
        "stream_s": PROGRESSIVE_STREAM_S,
    }


# --- helpers ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_wecom() -> Iterator[tuple[FakeWeComServer, str]]:
    server = FakeWeComServer(corp_id=CORP_ID, corp_secret=CORP_SECRET)
    with serve(server.app) as url:
        yield server, url


def loadgen(
    *,
    port: int,
    connections: int,
    duration: float = 0.0,
    warmup: float = 0.0,
    requests: int = 0,
    rate: float = 0.0,
    pool: int = 4096,
    seed: str = "n",
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--pool",
        str(pool),
        "--seed",
        seed,
    ]
    if requests:
        argv += ["--requests", str(requests)]
    else:
        argv += ["--duration", str(duration), "--warmup", str(warmup), "--rate", str(rate)]
    result = subprocess.run(
        argv, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=duration + warmup + 120
    )
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed ({result.returncode}):\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def start_loadgen(
    *, port: int, connections: int, duration: float, warmup: float, rate: float, seed: str
) -> subprocess.Popen[str]:
    """The load generator as a separate process, running while the caller does something else."""
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--rate",
        str(rate),
        "--seed",
        seed,
    ]
    return subprocess.Popen(
        argv, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_loadgen(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}):\n{err[-3000:]}")
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def settle_sync(wecom: FakeWeComServer, quiet_s: float = 0.3, timeout: float = 15.0) -> None:
    """Wait until the service's background pulls stop (no new sync_msg call for `quiet_s`)."""
    deadline = time.monotonic() + timeout
    last, last_change = wecom.sync_calls, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_calls = wecom.sync_calls
        if now_calls != last:
            last, last_change = now_calls, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return


def idle_cpu_rate(proc: Proc, seconds: float = 1.0) -> float:
    """CPU seconds per second the process burns doing nothing (subtracted from run CPU)."""
    before = proc.cpu()
    time.sleep(seconds)
    return (proc.cpu() - before) / seconds


def summarize_profile(prof: Path, name: str, top: int = 30) -> str:
    """A cProfile dump → Markdown: the functions with the most own time and the most cumulative time."""
    stats = pstats.Stats(str(prof))
    pipeline = prof.with_name(prof.name + ".pipeline")  # the pipeline thread's (bench/profiled_service.py)
    if pipeline.exists():
        stats.add(str(pipeline))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    idle = sum(tt for (f, _, fn), (_, _, tt, _, _) in entries.items() if "poll" in fn and "epoll" in fn)

    def label(key: tuple[str, int, str]) -> str:
        path, line, function = key
        for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        return f"{function} ({path}:{line})" if line else function

    busy = max(total - idle, 1e-9)
    lines = [
        f"# cProfile: {name}",
        "",
        f"{total:.2f} s profiled, of which {idle:.2f} s waiting in epoll; percentages are of the "
        f"{busy:.2f} s busy time (cProfile roughly doubles Python's cost).",
        "",
    ]
    for title, column in (("Own time (tottime)", 2), ("Cumulative time (cumtime)", 3)):
        lines += [f"## {title}", "", "| % busy | seconds | calls | function |", "|---:|---:|---:|---|"]
        ranked = sorted(entries.items(), key=lambda kv: -kv[1][column])
        shown = 0
        for key, value in ranked:
            if "poll" in key[2] and "epoll" in key[2]:
                continue
            lines.append(
                f"| {100 * value[column] / busy:.1f} | {value[column]:.3f} | {value[1]} | `{label(key)}` |"
            )
            shown += 1
            if shown >= top:
                break
        lines.append("")
    return "\n".join(lines)


# --- reporting -------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def webhook_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (connections, offered rate) and side; flat-out levels first, then paced ones."""
    out: list[dict[str, Any]] = []
    for connections, rate in sorted(
        {(r["connections"], r.get("rate", 0.0)) for r in rows}, key=lambda k: (k[1], k[0])
    ):
        entry: dict[str, Any] = {"connections": connections, "rate": rate}
        for kind in ("service", "baseline"):
            mine = [
                r
                for r in rows
                if (r["connections"], r.get("rate", 0.0)) == (connections, rate) and r["kind"] == kind
            ]
            entry[kind] = {
                "rps": _median([r["rps"] for r in mine]),
                "p50_ms": _median([r["p50_ms"] for r in mine]),
                "p99_ms": _median([r["p99_ms"] for r in mine]),
                "cpu_us": _median([r["server_cpu_us_per_req"] for r in mine]),
                "client_cpu_pct": _median([r["client_cpu_pct"] for r in mine]),
                "requests": sum(r["total_requests"] for r in mine),
                "sync_calls": sum(r["sync_calls"] for r in mine),
                "non_200": sum(v for r in mine for k, v in r["statuses"].items() if k != "200")
                + sum(r["errors"] for r in mine),
            }
        entry["ratio"] = entry["service"]["rps"] / entry["baseline"]["rps"] if entry["baseline"]["rps"] else 0
        out.append(entry)
    return out


def targets(results: Results) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed); passed None when the section did not run."""
    out: list[tuple[str, str, bool | None]] = []
    summary = webhook_summary(results.webhook) if results.webhook else []
    flat = [e for e in summary if not e["rate"]]
    if flat:
        worst = min(flat, key=lambda e: e["ratio"])
        ratios = ", ".join(f"c={e['connections']}: {e['ratio']:.2f}" for e in flat)
        out.append(
            (
                f"webhook ≥ {WEBHOOK_RATIO_MIN} × bare endpoint req/s (every level, flat out)",
                ratios,
                worst["ratio"] >= WEBHOOK_RATIO_MIN,
            )
        )
    paced = next((e for e in summary if e["rate"] and e["connections"] == 64), None)
    saturated = next((e for e in flat if e["connections"] == 64), None)
    if paced is not None:
        p99 = paced["service"]["p99_ms"]
        extra = ""
        if saturated is not None:
            extra = (
                f"; flat out: {saturated['service']['p99_ms']:.1f} ms "
                f"(bare endpoint {saturated['baseline']['p99_ms']:.1f} ms: queueing, see §1)"
            )
        out.append(
            (
                f"webhook p99 < {WEBHOOK_P99_MS_AT_64:g} ms at 64 connections "
                f"({paced['rate']:g} req/s offered)",
                f"{p99:.2f} ms (bare {paced['baseline']['p99_ms']:.2f} ms){extra}",
                p99 < WEBHOOK_P99_MS_AT_64,
            )
        )
    if results.flood:
        f = results.flood
        out.append(
            (
                f"flood of {f['callbacks_sent']} callbacks, one kf → ≤ {FLOOD_SYNC_MAX} sync_msg calls",
                f"{f['sync_calls']} sync_msg calls",
                f["sync_calls"] <= FLOOD_SYNC_MAX,
            )
        )
    for store, runs in results.pipeline.items():
        worst_cpu = max(r["cpu_ms_per_msg"] for r in runs)
        all_answered = all(r["answered"] == r["messages"] for r in runs)
        out.append(
            (
                f"pipeline CPU per answered message < {PIPELINE_CPU_MS_MAX:g} ms ({store})",
                f"{worst_cpu:.2f} ms (worst run)" + ("" if all_answered else ", NOT ALL ANSWERED"),
                worst_cpu < PIPELINE_CPU_MS_MAX and all_answered,
            )
        )
        if len(runs) >= 2:
            growth = (runs[-1]["rss_after_kib"] - runs[-2]["rss_after_kib"]) / 1024
            complete = all(r["answered"] == r["messages"] for r in runs)
            # The in-process store keeps a done mark per message for 4 days by design: scale with the run.
            limit = GROWTH_MIB_MAX * runs[-1]["messages"] / 1000
            out.append(
                (
                    f"no RSS growth across pipeline runs ({store}): last − previous < {limit:g} MiB "
                    f"({GROWTH_MIB_MAX:g} MiB per 1,000 messages)",
                    " → ".join(f"{r['rss_after_kib'] / 1024:.1f}" for r in runs)
                    + f" MiB ({growth:+.2f})"
                    + ("" if complete else ", runs incomplete: not a valid check"),
                    growth < limit if complete else None,
                )
            )
    if results.concurrency:
        worst_run = max(results.concurrency, key=lambda r: r["elapsed_s"])
        ok = worst_run["answered"] == worst_run["messages"] and worst_run["elapsed_s"] < CONCURRENCY_MAX_S
        out.append(
            (
                f"{worst_run['messages']} customers, Dify {worst_run['dify_delay_s']:g} s: all answered "
                f"< {CONCURRENCY_MAX_S:g} s",
                f"{worst_run['answered']}/{worst_run['messages']} in {worst_run['elapsed_s']:.2f} s",
                ok,
            )
        )
    out += burst_targets(results.burst)
    services = [m for m in results.memory if m["process"].startswith("service")]
    if services:
        peak = max(m["peak_kib"] for m in services) / 1024
        out.append(
            (
                f"peak RSS < {PEAK_RSS_MIB_MAX:g} MiB in every service run",
                f"max {peak:.1f} MiB",
                peak < PEAK_RSS_MIB_MAX,
            )
        )
    return out


def burst_targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """The targets of issue #14 for the burst rows that ran."""
    out: list[tuple[str, str, bool | None]] = []
    for r in rows:
        done = f"{r['answered']}/{r['messages']} in {r['elapsed_s']:.2f} s"
        complete = r["answered"] == r["messages"] and not r["stalled"]
        instances = len(r["peak_rss_kib"])
        if r.get("ack"):
            p99 = r["ack"]["p99_ms"]
            out.append(
                (
                    f"defaults: ack p99 < {BURST_ACK_P99_MS:g} ms at 200 callbacks/s during the 1,000 burst",
                    f"p50 {r['ack']['p50_ms']:.1f} / p99 {p99:.1f} ms",
                    p99 < BURST_ACK_P99_MS,
                )
            )
        elif r["capacity"]:
            limit = BURST_CAPACITY_FACTOR * r["ideal_s"]
            ok = complete and r["fallback_texts"] == 0 and r["elapsed_s"] <= limit
            out.append(
                (
                    f"defaults: {r['messages']} customers, Dify capacity {r['capacity']}: all answered, "
                    f"0 fallbacks, ≤ {limit:g} s ({BURST_CAPACITY_FACTOR:g} × ideal)",
                    f"{done}, {r['fallback_texts']} fallbacks, {r['dify_rejected']} × 429",
                    ok,
                )
            )
        elif instances > 1:
            shares = [100 * n / max(sum(r["answered_by_instance"]), 1) for n in r["answered_by_instance"]]
            lo, hi = BURST_SPLIT
            ok = (
                complete
                and r["duplicate_answers"] == 0
                and r["elapsed_s"] <= BURST_1000_MAX_S
                and all(lo <= s <= hi for s in shares)
            )
            out.append(
                (
                    f"defaults: {r['messages']} at once over {instances} instances + Memcached: answered "
                    f"exactly once, ≤ {BURST_1000_MAX_S:g} s, each instance {lo:g}–{hi:g} %",
                    f"{done}, {r['duplicate_answers']} duplicates, split {r['split']}",
                    ok,
                )
            )
        else:
            limit = BURST_300_MAX_S if r["messages"] <= 300 else BURST_1000_MAX_S
            out.append(
                (
                    f"defaults: {r['messages']} customers at once, Dify {r['dify_delay_s']:g} s: "
                    f"all answered ≤ {limit:g} s",
                    done,
                    complete and r["elapsed_s"] <= limit,
                )
            )
    return out


def _memcached_cell(r: dict[str, Any]) -> str:
    if "memcached_cmds" not in r:
        return "| – "
    if r["memcached_cmds_per_msg"] is None:
        return f"| {r['memcached_cmds']} commands, no answer ({r['memcached_cas_conflicts']}) "
    return f"| {r['memcached_cmds_per_msg']:.1f} ({r['memcached_cas_conflicts']}) "


def progressive_section(rows: list[dict[str, Any]]) -> list[str]:
    """## 6: when a long streamed answer's first and last parts reach the customer."""
    lines = [
        "## 6. Progressive replies: a 6 KB answer streamed evenly over 10 s",
        "",
        f"Target: the first part reaches the customer within {PROGRESSIVE_FIRST_MAX_S:g} s "
        "(progressive mode).",
        "",
        "| mode | first part | last part | messages | each part arrived at | result |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        result = ""
        if r["mode"] == "progressive":
            result = "PASS" if r["complete"] and r["first_s"] <= PROGRESSIVE_FIRST_MAX_S else "**MISS**"
        arrivals = ", ".join(f"{a:.2f}" for a in r["arrivals_s"])
        lines.append(
            f"| {r['mode']} | {r['first_s']:.2f} s | {r['last_s']:.2f} s | {r['parts']} | {arrivals} s "
            f"| {result} |"
        )
    lines.append("")
    return lines


def render(results: Results) -> str:
    m = results.machine
    lines = [
        "# kf-dify benchmark results",
        "",
        f"Generated by `python -m bench --{results.budget}` on {results.started} "
        f"({results.duration_s:.0f} s wall).",
        "",
        "| Machine | |",
        "|---|---|",
        f"| CPU | {m.get('cpu')} ({m.get('cores')} cores) |",
        f"| RAM | {m.get('ram')} |",
        f"| Python | {m.get('python')} |",
        f"| OS | {m.get('os')} |",
        f"| Server stack | {m.get('server')} (service, baseline and fake Dify alike) |",
        f"| Commit | `{m.get('commit')}` (worktree {m.get('worktree')}) |",
        "",
        f"Service settings: `LOG_LEVEL = WARNING` (logging is not what we measure), "
        f"`[BOT] DIFY_CONCURRENCY = {DIFY_CONCURRENCY}` (the adaptive limit's ceiling; default 1000), "
        "`RECOVERY_INTERVAL = 0`, in-process store unless a row says Memcached; the burst rows (§6) run "
        "with the service's defaults instead. Everything on 127.0.0.1.",
        "",
    ]
    if results.what_if:
        lines += [
            f"**WHAT-IF run: the service ran with proposed fixes patched in ({', '.join(results.what_if)}; "
            "see bench/whatif.py). These are not the numbers of the committed code.**",
            "",
        ]
    if results.profiled:
        lines += ["**Profiled run** (cProfile inside the service): its numbers are about 2x slower.", ""]
    lines += ["## Targets", "", "| Target | Measured | Result |", "|---|---|---|"]
    for name, measured, passed in targets(results):
        verdict = "n/a" if passed is None else ("PASS" if passed else "**MISS**")
        lines.append(f"| {name} | {measured} | {verdict} |")
    lines.append("")

    if results.webhook:
        lines += [
            "## 1. Webhook acknowledgement (service vs bare Starlette endpoint)",
            "",
            f"Valid signed callbacks (distinct nonces/ciphertexts) for one kf account; medians of "
            f"{max(r['round'] for r in results.webhook) + 1} alternated A/B rounds per level; "
            "server CPU is the server process's CPU time per request (from /proc). Flat-out rows: every "
            "connection sends its next request as soon as the answer arrives (saturation: latency there is "
            f"mostly queueing, p50 ≈ connections / throughput); the `@ {PACED_RATE:g}/s` row offers a fixed "
            "total rate over 64 connections, which is the latency a callback sees below saturation.",
            "",
            "| conns | service req/s | bare req/s | ratio | service p50 / p99 ms | bare p50 / p99 ms "
            "| CPU µs/req service / bare | sync_msg calls | client CPU % |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in webhook_summary(results.webhook):
            s, b = e["service"], e["baseline"]
            level = f"{e['connections']} @ {e['rate']:g}/s" if e["rate"] else str(e["connections"])
            lines.append(
                f"| {level} | {s['rps']:.0f} | {b['rps']:.0f} | {e['ratio']:.2f} "
                f"| {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} "
                f"| {s['cpu_us']:.0f} / {b['cpu_us']:.0f} | {s['sync_calls']} for {s['requests']} callbacks "
                f"| {s['client_cpu_pct']:.0f} / {b['client_cpu_pct']:.0f} |"
            )
        non200 = sum(
            e[k]["non_200"] for e in webhook_summary(results.webhook) for k in ("service", "baseline")
        )
        lines += ["", f"Non-200 answers or client errors: {non200}.", ""]
    if results.flood:
        f = results.flood
        lines += [
            "### Flood: coalescing of callbacks for one kf account",
            "",
            "| callbacks sent | acked 200 | took | sync_msg calls | service `pulls` / `pulls_coalesced` |",
            "|---:|---:|---:|---:|---:|",
            f"| {f['callbacks_sent']} | {f['acked_200']} | {f['elapsed_s']:.2f} s ({f['rps']:.0f}/s) "
            f"| {f['sync_calls']} | {f['pulls']} / {f['pulls_coalesced']} |",
            "",
        ]
    if results.pipeline:
        lines += [
            "## 2. Pipeline: callback → sync_msg → Dify → send_msg (zero-latency fakes)",
            "",
            "Each run: every customer holds a conversation: a message is added to the fake WeCom log and its "
            "callback posted (8 keep-alive connections), and the customer writes again as soon as the reply "
            "arrives (WeCom allows 5 replies per customer message, so nobody queues messages). Fake Dify "
            "answers at once: about 110 characters of Markdown in 4-character SSE chunks. CPU is the "
            "service process's, less its idle rate, per answered message (its callback included).",
            "",
            "| store | run | customers × turns | answered | msg/s | latency p50 / p99 ms | sync_msg "
            "| Dify requests / TCP connections | memcached commands per msg (CAS conflicts) | CPU ms/msg "
            "| service CPU % | fakes CPU % | RSS after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for store, runs in results.pipeline.items():
            for i, r in enumerate(runs):
                lines.append(
                    f"| {store} | {i + 1} | {r['customers']} × {r['turns']} "
                    f"| {r['answered']}/{r['messages']}{' (stalled)' if r['stalled'] else ''} "
                    f"| {r['msgs_per_s']:.0f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['sync_calls']} "
                    f"| {r['dify_requests']} / {r['dify_connections']} "
                    + _memcached_cell(r)
                    + f"| {r['cpu_ms_per_msg']:.2f} | {r['service_cpu_pct']:.0f} | {r['fakes_cpu_pct']:.0f} "
                    f"| {r['rss_after_kib'] / 1024:.1f} MiB |"
                )
        stalls = [(store, i + 1, r) for store, runs in results.pipeline.items() for i, r in enumerate(runs)]
        for store, run, r in stalls:
            if r["stalled"]:
                lines.append(
                    f"\n{store} run {run} stalled: {r['messages'] - r['answered']} message(s) got no reply "
                    f"(no progress for {r.get('stall_s', 10):g} s; first customer message indices "
                    f"{r['unanswered_msgids'][:5]}); "
                    f"{r['other_replies']} reply(ies) to an earlier run's messages arrived during this run."
                )
        lines.append("")
    if results.concurrency:
        lines += [
            "## 3. Concurrency: customers writing at once, Dify answering after a fixed delay",
            "",
            "| customers | Dify delay | all answered in | over the floor | latency p50 / p99 "
            "| Dify streams at once (peak) | Dify TCP connections | CPU ms/msg |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results.concurrency:
            lines.append(
                f"| {r['messages']} | {r['dify_delay_s']:g} s | {r['answered']}/{r['messages']} in "
                f"{r['elapsed_s']:.2f} s | +{r['elapsed_s'] - r['dify_delay_s']:.2f} s "
                f"| {r['p50_ms'] / 1000:.2f} / {r['p99_ms'] / 1000:.2f} s | {r['dify_peak_streams']} "
                f"| {r['dify_connections']} "
                f"| {r['cpu_ms_per_msg']:.2f} |"
            )
        lines.append("")
    if results.progressive:
        lines += progressive_section(results.progressive)
    if results.burst:
        lines += [
            "## 6. Bursts at the service's defaults (issue #14)",
            "",
            "Each row: a new service process with nothing tuned (no `DIFY_CONCURRENCY`, default `LOG_LEVEL` "
            "INFO, default `RECOVERY_INTERVAL`; only credentials and addresses set), the customers' messages "
            "added to the fake WeCom and their callbacks posted over 64 connections as fast as they go, the "
            "fake Dify answering each after its delay (capacity rows: 429 `too_many_requests` beyond N "
            "answers in flight). Ideal = Dify delay, or customers / capacity × delay. Interim and fallback "
            "texts are counted at the fake WeCom; 429s at the fake Dify. The ack probe is a separate load "
            "process sending 200 signed callbacks/s over 16 connections while the burst is answered.",
            "",
            "| row | answered | time to last answer | ideal | latency p50 / p99 | fallback texts "
            "| interim texts | Dify 429s | Dify streams at once | ack p50 / p99 | split | CPU ms/msg "
            "| peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results.burst:
            ack = f"{r['ack']['p50_ms']:.1f} / {r['ack']['p99_ms']:.1f} ms" if r.get("ack") else "–"
            split = r["split"] if len(r["peak_rss_kib"]) > 1 else "–"
            rss = " / ".join(f"{k / 1024:.1f}" for k in r["peak_rss_kib"])
            lines.append(
                f"| {r['row']} | {r['answered']}/{r['messages']}{' (stalled)' if r['stalled'] else ''} "
                f"| {r['elapsed_s']:.2f} s | {r['ideal_s']:g} s "
                f"| {r['p50_ms'] / 1000:.2f} / {r['p99_ms'] / 1000:.2f} s | {r['fallback_texts']} "
                f"| {r['interim_texts']} | {r['dify_rejected']} | {r['dify_peak']} | {ack} | {split} "
                f"| {r['cpu_ms_per_msg']:.2f} | {rss} MiB |"
            )
        lines.append("")
    if results.memory:
        lines += [
            "## 4. Memory (VmHWM = peak RSS, from /proc/<pid>/status)",
            "",
            "| run | process | peak RSS | RSS at end | |",
            "|---|---|---:|---:|---|",
        ]
        for row in results.memory:
            lines.append(
                f"| {row['run']} | {row['process']} | {row['peak_kib'] / 1024:.1f} MiB "
                f"| {row['rss_kib'] / 1024:.1f} MiB | {row['note']} |"
            )
        lines.append("")
    if results.crypto:
        c = results.crypto
        ops, us = c["ops_per_s"], c["us_per_op"]
        labels = {
            "full": "decrypt_callback + parse_notice (kf-dify)",
            "raw_aes": "raw AES-256-CBC decrypt, same ciphertext (pycryptodome)",
            "step_envelope_fast": "· envelope read (flat-document fast path, as used)",
            "step_envelope_xml_defusedxml": "· envelope XML parse (defusedxml: what any other document gets)",
            "step_envelope_xml_stdlib": "· envelope XML parse (stdlib ElementTree, for comparison)",
            "step_signature_sha1": "· signature (sorted concat + SHA-1)",
            "step_base64": "· base64 decode",
            "step_parse_notice": "· parse_notice (inner XML, fast path)",
        }
        lines += [
            "## 5. Callback crypto and parsing (one core, in-process)",
            "",
            f"Body {c['bytes']['body']} bytes, ciphertext {c['bytes']['ciphertext']} bytes; best of the "
            f"alternated rounds. kf-dify / raw AES = {c['ratio_full_to_raw']:.2f}.",
            "",
            "| operation | ops/s | µs/op |",
            "|---|---:|---:|",
        ]
        for key, label in labels.items():
            lines.append(f"| {label} | {ops[key]:,.0f} | {us[key]:.1f} |")
        lines.append("")
    if results.profiles:
        lines += ["Profiles of this run: " + ", ".join(f"`{p}`" for p in results.profiles), ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small budgets, ~2-4 min on 2 cores (default)")
    size.add_argument("--full", action="store_true", help="bigger budgets (~8-10 min)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--profile", action="store_true", help="run the service under cProfile; summaries in bench/out/<run>/"
    )
    parser.add_argument(
        "--rerender",
        metavar="RESULTS_JSON",
        help="only rewrite the report (with the current FINDINGS.md) from bench/out/<run>/results.json",
    )
    parser.add_argument(
        "--what-if",
        default="",
        help="comma-separated patches from bench/whatif.py to measure proposed fixes (not the product)",
    )
    parser.add_argument("--results", default="", help="where to write results (default bench/RESULTS.md)")
    parser.add_argument(
        "--findings",
        default=str(ROOT / "bench" / "FINDINGS.md"),
        help="appended to RESULTS.md when it exists",
    )
    args = parser.parse_args(argv)
    # The load generator and the fake WeCom server are two threads of this process. At Python's default
    # 5 ms switch interval every answer of the fake WeCom (service_state/get, send_msg, sync_msg) can wait
    # up to 5 ms for the load generator to yield the GIL, which the service would see as WeCom latency.
    sys.setswitchinterval(0.0005)
    if args.rerender:
        source = Path(args.rerender)
        results = Results(**json.loads(source.read_text(encoding="utf-8")))
        report = render(results)
        findings = Path(args.findings)
        if findings.is_file():
            report += "\n" + findings.read_text(encoding="utf-8")
        target = Path(args.results or (ROOT / "bench" / "RESULTS.md"))
        target.write_text(report, encoding="utf-8")
        log(f"wrote {target} from {source}")
        return 0
    budget = FULL if args.full else QUICK
    # SIGTERM (timeout, CI cancel) unwinds like Ctrl-C: the finally blocks stop every child process.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sections = args.only or list(SECTIONS)
    what_if = [n.strip() for n in args.what_if.split(",") if n.strip()]
    unknown = [n for n in what_if if n not in PATCHES]
    if unknown:
        parser.error(f"unknown --what-if patch(es) {unknown}; choose from {', '.join(PATCHES)}")
    bench = Bench(budget, profile=args.profile, what_if=what_if)
    bench.results.machine = machine_info()
    bench.results.started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    log(f"budget {budget.name}; sections {', '.join(sections)}; logs in {bench.out.relative_to(ROOT)}")
    started = time.monotonic()
    steps: dict[str, Callable[[], None]] = {
        "crypto": bench.run_crypto,
        "webhook": bench.run_webhook,
        "pipeline": bench.run_pipelines,
        "concurrency": bench.run_concurrency,
        "progressive": bench.run_progressive,
        "burst": bench.run_burst,
    }
    try:
        for section in SECTIONS:
            if section in sections:
                steps[section]()
    finally:
        bench.close()
    bench.results.duration_s = time.monotonic() - started
    report = render(bench.results)
    # Only a plain run may replace bench/RESULTS.md; profiled, what-if and partial runs stay in their folder.
    plain = not (args.profile or what_if or args.only)
    results_path = Path(
        args.results or (ROOT / "bench" / "RESULTS.md" if plain else bench.out / "RESULTS.md")
    )
    findings = Path(args.findings)
    if findings.is_file():
        report += "\n" + findings.read_text(encoding="utf-8")
    results_path.write_text(report, encoding="utf-8")
    (bench.out / "results.json").write_text(json.dumps(bench.results.__dict__, indent=1, default=str))
    print(report)
    log(f"wrote {results_path} ({bench.results.duration_s:.0f} s)")
    return 0
