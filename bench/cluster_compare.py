"""The cluster against one replica, from bench/serving.py's JSON files and the cluster's /metrics.

    python bench/cluster_compare.py --single single.json --cluster cluster.json --metrics cluster_metrics.txt \
        [--json comparison.json]

Prints, per concurrency level, output tok/s and TTFT p50 / p99 of both and the cluster's ratio, then the
routing hit rate: the share of adapter requests that reached a replica already holding that adapter
(loraserve_cluster_adapter_requests_total, summed over replicas).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "loraserve_cluster_adapter_requests_total"
EVICTIONS = "loraserve_cluster_adapter_evictions_total"


def routing(metrics_text: str) -> dict:
    """Hits, misses and evictions per replica and in all, from the cluster's merged /metrics."""
    per_replica: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in (REQUESTS, EVICTIONS):
                key = sample.labels.get("outcome", "evictions")
                counts = per_replica.setdefault(sample.labels["replica"], {"hit": 0.0, "miss": 0.0, "evictions": 0.0})
                counts[key] += sample.value
    hits = sum(c["hit"] for c in per_replica.values())
    misses = sum(c["miss"] for c in per_replica.values())
    return {
        "hits": hits,
        "misses": misses,
        "evictions": sum(c["evictions"] for c in per_replica.values()),
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "replicas": per_replica,
    }


def levels(serving_json: dict) -> dict[int, dict]:
    return {s["level"]: s for s in serving_json["levels"] if s["mode"] == "concurrency"}


def compare(single: dict, cluster: dict) -> list[dict]:
    one, many = levels(single), levels(cluster)
    rows = []
    for level in sorted(set(one) & set(many)):
        a, b = one[level], many[level]
        rows.append(
            {
                "concurrency": level,
                "single_tok_s": a["output_throughput"],
                "cluster_tok_s": b["output_throughput"],
                "ratio": b["output_throughput"] / a["output_throughput"] if a["output_throughput"] else None,
                "single_ttft_ms": (a["ttft_ms"]["p50"], a["ttft_ms"]["p99"]),
                "cluster_ttft_ms": (b["ttft_ms"]["p50"], b["ttft_ms"]["p99"]),
                "errors": (sum(a["errors"].values()), sum(b["errors"].values())),
            }
        )
    return rows


def table(rows: list[dict], route: dict) -> str:
    lines = [
        "| concurrency | one replica tok/s | cluster tok/s | cluster / one | TTFT p50/p99 ms, one | cluster | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['concurrency']} | {r['single_tok_s']:.1f} | {r['cluster_tok_s']:.1f} | {ratio} | "
            f"{r['single_ttft_ms'][0]:.0f} / {r['single_ttft_ms'][1]:.0f} | "
            f"{r['cluster_ttft_ms'][0]:.0f} / {r['cluster_ttft_ms'][1]:.0f} | {r['errors'][0]} / {r['errors'][1]} |"
        )
    rate = "n/a" if route["hit_rate"] is None else f"{route['hit_rate']:.3f}"
    lines.append(
        f"\nrouting hit rate {rate} ({route['hits']:.0f} hits, {route['misses']:.0f} misses, "
        f"{route['evictions']:.0f} evictions over {len(route['replicas'])} replicas)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--single", type=Path, required=True)
    p.add_argument("--cluster", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = compare(json.loads(args.single.read_text()), json.loads(args.cluster.read_text()))
    route = routing(args.metrics.read_text())
    print(table(rows, route))
    if args.json:
        args.json.write_text(json.dumps({"levels": rows, "routing": route}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
