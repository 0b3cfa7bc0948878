"""One markdown table of every benchmark: per workload and metric, our result, each peer's, the
speedup, the bound where the bench measures one and the peak memory where it records it.

    python bench/report.py RESULTS... [--out TABLE.md]

RESULTS: JSON files written by the bench scripts' --json (one doc each), or by
`bench/common.py merge` (a list of docs), or folders of them (their *.json). The table goes to
stdout, and with --out to a file as well. How each bench's records read is in BENCHES below; a
bench or a record it does not know is an error that names the file and the bench.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ReportError(ValueError):
    """An input the report cannot read."""


# ------------------------------------------------------------------ how to read each bench
@dataclass(frozen=True)
class Metric:
    name: str
    path: tuple[str, ...]  # where a record holds the value, e.g. ("fwd+bwd", "median_s")
    unit: str = "s"  # "s": lower is better; a rate such as "images/s": higher is better
    memory: str | None = None  # the record key of this measurement's peak bytes
    bound: tuple[str, str] | None = None  # (what the bound is, the key of its time in our record)


@dataclass(frozen=True)
class PerImpl:
    """One record per implementation ("impl"), grouped by workload; ours is one of them."""
    ours: str
    workload: Callable[[dict], str]
    metrics: tuple[Metric, ...]
    on_cpu: Callable[[dict], bool] = lambda record: False  # ran on the CPU whatever the doc's device


@dataclass(frozen=True)
class Peer:
    name: str
    key: str
    error_key: str | None = None  # where the record says why this peer has no time


@dataclass(frozen=True)
class Comparison:
    metric: str  # str.format-ted with the record
    ours: str  # the key of our value
    peers: tuple[Peer, ...] = ()
    unit: str = "s"
    bound: tuple[str, str] | None = None  # (what the bound is, the key of its time)


@dataclass(frozen=True)
class Wide:
    """One record per workload holding ours and the peers under their own keys."""
    workload: Callable[[dict], str]
    comparisons: tuple[Comparison, ...]
    on_cpu: Callable[[dict], bool] = lambda record: False
    whole_doc: bool = False  # the doc is the one record (it has no "results")


def median(*keys: str) -> tuple[str, ...]:
    return (*keys, "median_s")


KMEANS_ASSIGN_PEERS = (Peer("torch matmul + argmax", "torch_baseline_assign_s"),)
GEMM_BOUND = ("GEMM alone", "gemm_bound_s")

BENCHES: dict[str, PerImpl | Wide] = {
    "attention_pool": PerImpl(
        ours="lusscore",
        workload=lambda r: r["case"] + (", grad of x" if r.get("grad_x") else ""),
        metrics=(Metric("fwd+bwd", median("fwd+bwd"), memory="peak_bytes_fwd+bwd",
                        bound=("HBM floor", "hbm_floor_s")),
                 Metric("fwd", median("fwd")),
                 Metric("bwd", median("bwd")),
                 Metric("fwd with mean attention", median("fwd_mean_attention")))),
    "hp_loss": PerImpl(
        ours="lusscore", workload=lambda r: r["case"],
        metrics=(Metric("fwd+bwd", median("fwd+bwd"), memory="peak_bytes"),)),
    "overlap_gather": PerImpl(
        ours="lusscore", workload=lambda r: f"{r['case']} {r['dtype']} {r['layout']}",
        metrics=(Metric("fwd", median("forward")),
                 Metric("fwd+bwd", median("fwd_bwd"), memory="peak_bytes"))),
    "seg_metrics": PerImpl(
        ours="lusscore", workload=lambda r: r["case"],
        metrics=(Metric("time", ("median_s",)),),
        on_cpu=lambda r: r["case"].startswith("matching")),  # numpy and Munkres
    "label": PerImpl(
        ours="lusscore", workload=lambda r: r["case"],
        metrics=(Metric("labelling, end to end", ("images_per_s",), unit="images/s"),)),
    "pipeline": PerImpl(
        ours="fused", workload=lambda r: r["case"],
        metrics=(Metric("throughput", ("images_per_s",), unit="images/s", memory="peak_bytes"),)),
    "pipeline_stages": PerImpl(
        ours="fused", workload=lambda r: r["case"],
        metrics=(Metric("wall time", ("seconds",), memory="peak_bytes"),
                 Metric("training, end to end", ("images_per_s",), unit="images/s"))),
    "kmeans": Wide(
        workload=lambda r: r["case"],
        comparisons=(
            Comparison("Lloyd step", "ours_step_s",
                       (Peer("torch baseline", "torch_baseline_step_s"),
                        Peer("torch.compile", "torch_compile_step_s", "torch_compile_error"),
                        Peer("faiss-cpu, 1 iteration", "faiss_iter_s"))),
            Comparison("assign, fused path", "ours_assign_fused_s", KMEANS_ASSIGN_PEERS,
                       bound=GEMM_BOUND),
            Comparison("assign, buffered path", "ours_assign_buffered_s", KMEANS_ASSIGN_PEERS,
                       bound=GEMM_BOUND),
            Comparison("assign", "ours_assign_s", (Peer("faiss-cpu search", "faiss_assign_s"),)),
            Comparison("fit, {niter} iterations", "fit_s"),
            Comparison("upload to the GPU", "upload_s")),
        on_cpu=lambda r: "threads" in r),  # the faiss-cpu cases, also run after the CUDA ones
    "synthetic": Wide(
        workload=lambda d: f"{d['images']} images of {d['config']['size']} px, {d['workers']} worker(s)",
        comparisons=(Comparison("generate (render + write)", "images_per_s", unit="images/s"),
                     Comparison("render only", "render_only_images_per_s", unit="images/s")),
        whole_doc=True),
}


# ------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Result:
    value: float | None = None
    error: str | None = None
    peak_bytes: int | None = None


@dataclass(frozen=True)
class Row:
    bench: str
    workload: str
    device: str
    metric: str
    unit: str
    ours: Result | None  # None: our implementation was not run
    peer: str = ""
    peer_result: Result | None = None
    bound: tuple[str, float] | None = None

    @property
    def speedup(self) -> float | None:
        """> 1: ours is faster (peer time / our time, or our rate / the peer's rate)."""
        ours = self.ours.value if self.ours else None
        peer = self.peer_result.value if self.peer_result else None
        if not ours or not peer:
            return None
        return peer / ours if self.unit == "s" else ours / peer


def number_at(record: dict, path: tuple[str, ...]) -> float | None:
    value = record
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ReportError(f"{'.'.join(path)} is {value!r}, not a number")
    return value


def device_of(record: dict, spec: PerImpl | Wide, doc_device: str) -> str:
    return doc_device if doc_device.startswith("cpu") or not spec.on_cpu(record) else "cpu"


def result_of(record: dict, metric: Metric) -> Result:
    return Result(number_at(record, metric.path), record.get("error"),
                  record.get(metric.memory) if metric.memory else None)


def per_impl_rows(bench: str, spec: PerImpl, doc_device: str, records: list[dict]) -> list[Row]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        if "impl" not in record:
            raise ReportError(f"a record without 'impl': {sorted(record)}")
        if "error" not in record and all(number_at(record, m.path) is None for m in spec.metrics):
            raise ReportError(f"{spec.workload(record)!r} ({record['impl']}): no measurement this "
                              f"report knows among {sorted(record)}")
        groups.setdefault(spec.workload(record), []).append(record)
    rows = []
    for workload, group in groups.items():
        ours = next((r for r in group if r["impl"] == spec.ours), None)
        peers = [r for r in group if r is not ours]
        metrics = [m for m in spec.metrics if any(number_at(r, m.path) is not None for r in group)]
        for metric in metrics or spec.metrics[:1]:  # every record failed: show the errors once
            bound = None
            if metric.bound and ours and number_at(ours, (metric.bound[1],)) is not None:
                bound = (metric.bound[0], number_at(ours, (metric.bound[1],)))
            shared = {"bench": bench, "workload": workload, "device": device_of(group[0], spec, doc_device),
                      "metric": metric.name, "unit": metric.unit, "bound": bound,
                      "ours": result_of(ours, metric) if ours else None}
            if not peers:
                rows.append(Row(**shared))
            for peer in peers:
                name = peer["impl"] + (f" ({peer['note']})" if peer.get("note") else "")
                rows.append(Row(**shared, peer=name, peer_result=result_of(peer, metric)))
    return rows


def wide_rows(bench: str, spec: Wide, doc_device: str, records: list[dict]) -> list[Row]:
    known = {key for c in spec.comparisons
             for key in (c.ours, c.bound and c.bound[1], *(k for p in c.peers for k in (p.key, p.error_key)))}
    rows = []
    for record in records:
        workload = spec.workload(record)
        unknown = sorted(k for k in record if k.endswith("_s") and k not in known)
        if unknown:  # a timing this report would leave out
            raise ReportError(f"{workload!r}: measurements this report does not know: {unknown}")
        comparisons = [c for c in spec.comparisons if c.ours in record]
        if not comparisons:
            raise ReportError(f"{workload!r}: no measurement this report knows among {sorted(record)}")
        for c in comparisons:
            shared = {"bench": bench, "workload": workload, "device": device_of(record, spec, doc_device),
                      "metric": c.metric.format(**record), "unit": c.unit,
                      "ours": Result(number_at(record, (c.ours,)))}
            if c.bound and number_at(record, (c.bound[1],)) is not None:
                shared["bound"] = (c.bound[0], number_at(record, (c.bound[1],)))
            peers = [p for p in c.peers if p.key in record or p.error_key in record]
            if not peers:
                rows.append(Row(**shared))
            for p in peers:
                error = record.get(p.error_key) if p.error_key else None
                peer_result = Result(number_at(record, (p.key,)), error)
                rows.append(Row(**shared, peer=p.name, peer_result=peer_result))
    return rows


def doc_rows(doc, source: str) -> list[Row]:
    if not isinstance(doc, dict) or "bench" not in doc:
        raise ReportError(f"{source}: not a bench result (a JSON object with a 'bench' key)")
    bench = doc["bench"]
    spec = BENCHES.get(bench)
    if spec is None:
        raise ReportError(f"{source}: unknown bench {bench!r} (bench/report.py reads "
                          f"{', '.join(sorted(BENCHES))})")
    records = [doc] if isinstance(spec, Wide) and spec.whole_doc else doc.get("results")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise ReportError(f"{source}: bench {bench!r}: no list of result records under 'results'")
    read = per_impl_rows if isinstance(spec, PerImpl) else wide_rows
    try:
        return read(bench, spec, str(doc.get("device", "")), records)
    except ReportError as exc:
        raise ReportError(f"{source}: bench {bench!r}: {exc}") from None
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        raise ReportError(f"{source}: bench {bench!r}: a record of unknown shape "
                          f"({type(exc).__name__}: {exc})") from None


def load_docs(paths) -> list[tuple[str, object]]:
    """(source, doc) of every doc in the files and folders given, in order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise ReportError(f"{path}: no such file or folder")
    docs = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not JSON ({exc})") from None
        if isinstance(data, list):  # bench/common.py merge's output
            docs += [(f"{path}[{i}]", doc) for i, doc in enumerate(data)]
        else:
            docs.append((str(path), data))
    return docs


def collect_rows(paths) -> list[Row]:
    return [row for source, doc in load_docs(paths) for row in doc_rows(doc, source)]


# ------------------------------------------------------------------ markdown
HEADER = ("benchmark", "workload", "device", "metric", "ours", "peer", "peer's result", "speedup",
          "bound (ours as a multiple)", "peak memory (ours / peer)")
LEGEND = ("speedup: the peer's time / ours, or our rate / the peer's for a rate (images/s); "
          "> 1 means ours is faster. bound: the least time the work could take (for k-means "
          "assignment the GEMM alone, measured in the same run; for attention_pool the HBM traffic "
          "at the GPU's peak bandwidth) and our time as a multiple of it.")


def sig(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_value(value: float, unit: str) -> str:
    if unit != "s":
        return f"{sig(value)} {unit}"
    for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= scale or name == "µs":
            return f"{sig(value / scale)} {name}"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.0f} MiB"


def format_result(result: Result | None, unit: str) -> str:
    if result is None:
        return ""
    if result.value is not None:
        return format_value(result.value, unit)
    if result.error:
        error = " ".join(result.error.split())
        return "error: " + (error if len(error) <= 80 else error[:79] + "…")
    return "—"


def cells(row: Row) -> list[str]:
    speedup = row.speedup
    bound = ""
    if row.bound:
        name, seconds = row.bound
        bound = f"{name} {format_value(seconds, 's')}"
        if row.ours and row.ours.value and seconds:
            bound += f" (ours {sig(row.ours.value / seconds)}x)"
    memory = ""
    peer_bytes = row.peer_result.peak_bytes if row.peer_result else None
    ours_bytes = row.ours.peak_bytes if row.ours else None
    if ours_bytes is not None or peer_bytes is not None:
        memory = format_bytes(ours_bytes)
        if row.peer_result:
            memory += " / " + format_bytes(peer_bytes)
    ours = format_result(row.ours, row.unit) if row.ours else "not run"
    return [row.bench, row.workload, row.device, row.metric, ours,
            row.peer, format_result(row.peer_result, row.unit),
            f"{sig(speedup)}x" if speedup is not None else "", bound, memory]


def markdown(rows: list[Row]) -> str:
    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    table = [line(HEADER), line(["---"] * len(HEADER)), *(line(cells(r)) for r in rows)]
    return LEGEND + "\n\n" + "\n".join(table) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+",
                   help="bench JSON files (one doc or a merged list) or folders of them")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        text = markdown(collect_rows(args.results))
    except ReportError as exc:
        print(f"bench/report.py: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    if args.out:
        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
