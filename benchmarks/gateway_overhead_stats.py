"""The numbers of `benchmarks.gateway_overhead`: latency percentiles, the gateway's overhead against a baseline
path, and where the gateway path's extra CPU per call goes."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def stats_ms(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def overhead(direct: dict[str, float], gateway: dict[str, float]) -> dict[str, float]:
    return {
        "p50_diff_ms": round(gateway["p50_ms"] - direct["p50_ms"], 2),
        "p99_diff_ms": round(gateway["p99_ms"] - direct["p99_ms"], 2),
        "p50_ratio": round(gateway["p50_ms"] / direct["p50_ms"], 3),
        "p99_ratio": round(gateway["p99_ms"] / direct["p99_ms"], 3),
    }


def cpu_breakdown(cpu_ms: dict[str, dict[str, float]], floor_ms: float) -> dict[str, float]:
    """Where the CPU the gateway path spends beyond the direct call goes, per call and as a share of the direct
    call's own CPU (caller and engine): the OpenAI client with an HTTP hop that answers at once (the client
    floor, which any OpenAI-compatible server costs its caller), the gateway's own work beyond that, and the
    engine's extra (the same calls, arriving later each, share fewer engine steps). On a box whose cores the
    caller shares with the engine, throughput falls by about the extra share."""
    direct = cpu_ms["direct"]["driver"] + cpu_ms["direct"]["engine"]
    extra = cpu_ms["gateway"]["driver"] + cpu_ms["gateway"]["engine"] - direct
    own = cpu_ms["gateway"]["driver"] - cpu_ms["direct"]["driver"] - floor_ms
    return {
        "direct_call_ms": round(direct, 3),
        "gateway_path_extra_ms": round(extra, 3),
        "client_and_http_floor_ms": floor_ms,
        "gateway_own_ms": round(own, 3),
        "engine_extra_ms": round(cpu_ms["gateway"]["engine"] - cpu_ms["direct"]["engine"], 3),
        "client_and_http_floor_share": round(floor_ms / direct, 3),
        "gateway_own_share": round(own / direct, 3),
    }
