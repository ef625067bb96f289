"""The fast path's forward on each inference engine: eager, TorchScript, torch.compile, ONNX Runtime, AOTInductor.

    .venv/bin/python bench/inference_engines.py [--windows 15] [--skip compile,aoti] [--warm-cache]

One call (1 user, 200-behaviour history) x 100 and x 1,000 candidates on the DARE
ranker shaped like configs/ml100k_sequence.yaml (ML-100K features, dim 16, top_k 32,
attention_dim 16), randomly initialised (the engines must agree for any weights);
its inputs built by serving's InputBuilder from ML-100K rows (the user with the most
ratings, his last 200; random distinct candidates), so the timed part is exactly what
``ServingModel.probabilities`` runs: ScoringInputs -> logits. torch.set_num_threads(1)
(as `plexrec serve --torch-threads 1`), ONNX Runtime with one intra-op thread.

Engines:
  eager            InferenceRanker.forward (today's choice)
  eager_one_call   OneCall below in eager: one call's forward, no per-call Python loop
  torchscript      OneCall traced (torch.jit.trace) and frozen (torch.jit.freeze + optimize_for_inference)
  compile          torch.compile(OneCall, dynamic=True); first calls (compile) timed
  compile_forward  torch.compile(InferenceRanker.forward, dynamic=True) unchanged (graph breaks at .tolist())
  onnxruntime      OneCall exported by torch.onnx.export (TorchScript exporter, dynamic n and L), ORT session
  aoti             torch.export(OneCall, dynamic n and L) -> torch._inductor.aoti_compile_and_package

Each engine's callable takes ScoringInputs and returns logits [n]; an engine built on
OneCall falls back to eager for the calls OneCall does not cover (several calls in one
batch, a history of at most top_k behaviours). Timing: all engines interleaved in
each window (order rotated), a window = ``repeats`` calls; median ms per call over
the windows, and the ratio to eager as the median of per-window ratios (paired: the
same round, so the same load on a shared machine). Inductor's on-disk caches are
disabled unless --warm-cache, so compile times are what a fresh host pays. Scores: each engine's probabilities against eager's, max |diff| (1e-5
required) on the real inputs, on both sizes, and on a history of 10 distinct items
repeated (exact score ties across the k-th place: the tie rule is exercised). The
share of eager's forward in top-k comes from torch.profiler (aten::topk alone, and
the whole top_k_mixing block). Writes bench/results/inference_engines.json and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from common import ROOT, machine, now, write_json
from torch import nn

from features.online import ItemFeatures, UserFeatures
from recsys import inference as inference_module
from recsys.config import load_config
from recsys.data.batching import model_inputs
from features.examples import build_examples
from features.movielens import movielens_schema, movielens_tables
from recsys.inference import InferenceRanker
from recsys.model import build_ranker
from serving.inputs import InputBuilder, ScoringInputs
from serving.model import inference_ranker

CONFIG = "configs/ml100k_sequence.yaml"
HISTORY = 200
CANDIDATES = (100, 1000)
REPEATS = {100: 40, 1000: 8}  # calls per window
TOLERANCE = 1e-5


# --- the model and its inputs ---


def build_model():
    """The DARE ranker of CONFIG on ML-100K, random weights scaled so its scores spread, and its fast path."""
    tables = movielens_tables(movielens_schema())
    schema = tables.schema
    config = load_config(ROOT / CONFIG)
    examples = build_examples(tables.joined(), schema)
    vocabularies = {f.name: torch.from_numpy(np.unique(examples.feature_values[f.name])) for f in config.features}
    torch.manual_seed(0)
    model = build_ranker(config, vocabularies, len(examples.dense_names)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.15)
    started = time.perf_counter()
    fast = inference_ranker(model, schema, examples.dense_names)
    _, history_length = model_inputs(config, schema.categorical_features)
    builder = InputBuilder(schema, fast, history_length)
    return tables, config, fast, builder, time.perf_counter() - started


def _cells(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (list, np.ndarray)) or not pd.isna(v)}


def online_items(tables) -> dict[int, ItemFeatures]:
    """Every movie as the online store reads it (profile, category = first genre)."""
    schema = tables.schema
    by_item = tables.items.set_index(schema.item, drop=False)
    counts = tables.interactions[schema.item].value_counts()
    items = {}
    for item_id in tables.interactions[schema.item].drop_duplicates().astype(int).tolist():
        profile = _cells({c: by_item.at[item_id, c] for c in schema.items.columns})
        genres = profile.get(schema.category)
        category = genres[0] if genres is not None and len(genres) else None
        items[item_id] = ItemFeatures(item_id=item_id, profile=profile, category=category,
                                      interaction_count=int(counts.get(item_id, 0)))
    return items


def heavy_user(tables) -> UserFeatures:
    """The user with the most ratings, his last HISTORY of them (oldest first)."""
    schema = tables.schema
    frame = tables.interactions.sort_values(schema.timestamp, kind="stable")
    user_id = int(frame[schema.user].value_counts().index[0])
    history = frame.loc[frame[schema.user] == user_id, schema.item].astype(int).tolist()[-HISTORY:]
    row = tables.users.set_index(schema.user, drop=False).loc[user_id]
    return UserFeatures(user_id=user_id, profile=_cells({c: row[c] for c in schema.users.columns}),
                        history_item_ids=history, history_timestamps=list(range(len(history))),
                        interaction_count=len(history))


# --- one call's forward, for the engines that want one graph ---


class OneCall(nn.Module):
    """InferenceRanker.forward for one call (one user part, one history of L > top_k behaviours):
    the same ops in the same order, without row_group, bincount().tolist() and the per-call loop,
    so that it traces / exports as one graph with dynamic n (candidates) and L (behaviours)."""

    def __init__(self, fast: InferenceRanker) -> None:
        super().__init__()
        if fast.mode != "dare":
            raise ValueError("this benchmark's OneCall is DARE's")
        # InferenceRanker's cross layers and tower read x in built order (the column order is folded in)
        self.cross, self.tower, self.head = fast.cross, fast.tower, fast.head
        self.k = fast.top_k
        self.scale = math.sqrt(fast.space.dim)
        self.logit_scale = fast.logit_scale  # tau of the softmax over the kept behaviours

    def forward(self, user_part: torch.Tensor, item_columns: torch.Tensor, item_dense: torch.Tensor,
                item_attention: torch.Tensor, item_representation: torch.Tensor,
                history_attention: torch.Tensor, positions: torch.Tensor,
                history_representation: torch.Tensor) -> torch.Tensor:
        # user_part [1, U]; item_* [n, .]; history_attention, positions [L, d_a]; history_representation [L, d_r]
        behaviours = history_attention + positions
        scores = item_attention @ behaviours.t() / self.scale
        # recsys.inference.top_k_mixing for L > k: TopK's values only, the tie rule by cumsum
        threshold = scores.topk(self.k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        above, tied = scores > threshold, scores == threshold
        # counts as int64 (eager counts bools as int64 too): ONNX's CumSum and ReduceSum take no bool
        room = self.k - above.long().sum(dim=1, keepdim=True)
        chosen = above | (tied & (tied.long().cumsum(dim=1) <= room))
        mixing = torch.softmax(scores.masked_fill(~chosen, float("-inf")) * self.logit_scale, dim=1)
        pooled = mixing @ history_representation
        target = item_representation
        x = torch.cat([user_part.expand(item_columns.shape[0], -1), item_columns, item_dense,
                       target, pooled, target * pooled], dim=1)
        return self.head(self.tower(self.cross(x))).squeeze(-1)


def one_call_args(fast: InferenceRanker, inputs: ScoringInputs) -> tuple[torch.Tensor, ...] | None:
    """OneCall's arguments for ``inputs``, or None where OneCall does not cover them."""
    history = inputs.history
    if len(inputs.user_part) != 1:
        return None
    length = int(history.lengths[0])
    if length <= fast.top_k:
        return None
    return (inputs.user_part, inputs.item_columns, inputs.item_dense, inputs.item_attention,
            inputs.item_representation, history.attention[0, :length], fast._positions(length),
            history.representation[0, :length])


def eager_forward(fast: InferenceRanker) -> Callable[[ScoringInputs], torch.Tensor]:
    def run(inputs: ScoringInputs) -> torch.Tensor:
        return fast(inputs.user_part, inputs.item_columns, inputs.item_dense, inputs.row_group, inputs.history,
                    inputs.item_attention, inputs.item_representation)
    return run


def on_one_call(fast: InferenceRanker, engine: Callable[..., torch.Tensor]) -> Callable[[ScoringInputs], torch.Tensor]:
    fallback = eager_forward(fast)

    def run(inputs: ScoringInputs) -> torch.Tensor:
        args = one_call_args(fast, inputs)
        return fallback(inputs) if args is None else engine(*args)
    return run


# --- the engines: each builds (callable, seconds to build/compile, note) ---


def build_torchscript(fast, one_call, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(one_call, example, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    return on_one_call(fast, frozen), "OneCall, torch.jit.trace + freeze + optimize_for_inference"


def build_compile(fast, one_call, example):
    compiled = torch.compile(one_call, dynamic=True)
    return on_one_call(fast, compiled), "OneCall, torch.compile(dynamic=True), inductor"


def build_compile_forward(fast, one_call, example):
    compiled = torch.compile(fast.forward, dynamic=True)

    def run(inputs: ScoringInputs) -> torch.Tensor:
        return compiled(inputs.user_part, inputs.item_columns, inputs.item_dense, inputs.row_group, inputs.history,
                        inputs.item_attention, inputs.item_representation)
    return run, "InferenceRanker.forward unchanged, torch.compile(dynamic=True) (graph breaks at .tolist())"


INPUT_NAMES = ["user_part", "item_columns", "item_dense", "item_attention", "item_representation",
               "history_attention", "positions", "history_representation"]


def export_onnx(one_call, example, path: str) -> None:
    axes = {"item_columns": {0: "n"}, "item_dense": {0: "n"}, "item_attention": {0: "n"},
            "item_representation": {0: "n"}, "history_attention": {0: "L"}, "positions": {0: "L"},
            "history_representation": {0: "L"}, "logits": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(one_call, example, path, input_names=INPUT_NAMES, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def build_onnxruntime(fast, one_call, example):
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(prefix="plexrec-onnx-"), "one_call.onnx")
    export_onnx(one_call, example, path)
    session = ort_session(path)

    def engine(*args: torch.Tensor) -> torch.Tensor:
        feeds = {name: arg.contiguous().numpy() for name, arg in zip(INPUT_NAMES, args)}
        return torch.from_numpy(session.run(None, feeds)[0])
    return on_one_call(fast, engine), f"OneCall, torch.onnx.export (opset 17), onnxruntime {ort.__version__} CPU EP"


def build_aoti(fast, one_call, example):
    from torch.export import Dim

    n, length = Dim("n", min=2, max=1 << 20), Dim("L", min=fast.top_k + 1, max=1 << 16)
    shapes = {"user_part": None, "item_columns": {0: n}, "item_dense": {0: n}, "item_attention": {0: n},
              "item_representation": {0: n}, "history_attention": {0: length}, "positions": {0: length},
              "history_representation": {0: length}}
    program = torch.export.export(one_call, example, dynamic_shapes=shapes)
    path = os.path.join(tempfile.mkdtemp(prefix="plexrec-aoti-"), "one_call.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    loaded = torch._inductor.aoti_load_package(path)
    return on_one_call(fast, loaded), "OneCall, torch.export (dynamic n, L) + aoti_compile_and_package"


ENGINES = {"torchscript": build_torchscript, "compile": build_compile, "compile_forward": build_compile_forward,
           "onnxruntime": build_onnxruntime, "aoti": build_aoti}


# --- measurements ---


def probabilities(run, inputs) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(run(inputs)).numpy()


def topk_share(fast: InferenceRanker, inputs: ScoringInputs, calls: int) -> dict:
    """Self CPU time of aten::topk and of the whole top_k_mixing block over eager's forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    original = inference_module.top_k_mixing

    def labelled(scores, k, logit_scale=1.0):
        with record_function("top_k_mixing"):
            return original(scores, k, logit_scale)

    run = eager_forward(fast)
    inference_module.top_k_mixing = labelled  # the profile's label only; same function
    try:
        with torch.inference_mode():
            for _ in range(3):
                run(inputs)
            with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("forward"):
                for _ in range(calls):
                    run(inputs)
    finally:
        inference_module.top_k_mixing = original
    events = {e.key: e for e in prof.key_averages()}
    total = events["forward"].cpu_time_total
    top = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    # the forward's time outside the profiler: the profiler's own overhead inflates small ops
    with torch.inference_mode():
        scores = torch.randn(inputs.item_columns.shape[0], HISTORY)
        started = time.perf_counter()
        for _ in range(calls):
            scores.topk(fast.top_k, dim=1, sorted=False)
        topk_alone = (time.perf_counter() - started) / calls * 1e3
    # 0 since top_k_mixing's threshold is numpy's partition (no aten::topk left in eager)
    return {"aten_topk_share": events["aten::topk"].cpu_time_total / total if "aten::topk" in events else 0.0,
            "top_k_mixing_share": events["top_k_mixing"].cpu_time_total / total,
            "topk_alone_ms": topk_alone,
            "top_ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total} for e in top]}


class TopKIndices(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = scores.topk(self.k, dim=1)
        return top.values, top.indices


def topk_tie_rule(fast: InferenceRanker, inputs: ScoringInputs) -> dict:
    """On real scores with ties across the k-th place: which behaviours a plain TopK (torch's, ORT's) picks
    against the rule (ties: the earlier behaviour first, as top_k_mixing keeps them), and whether
    ORT's TopK values equal torch's. (OneCall reads only TopK's values, so its picks never depend on this.)"""
    args = one_call_args(fast, inputs)
    with torch.inference_mode():
        scores = args[3] @ (args[5] + args[6]).t() / math.sqrt(fast.space.dim)
        rule = inference_module.top_k_mixing(scores, fast.top_k) > 0
    k = fast.top_k
    threshold = scores.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    tied_at_kth = ((scores == threshold).sum(1) > k - (scores > threshold).sum(1)).sum().item()

    def picks(indices: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rule).scatter_(1, indices, True)

    values, indices = scores.topk(k, dim=1)
    report = {"rows": len(scores), "rows_tied_across_kth": int(tied_at_kth),
              "torch_topk_rows_as_rule": int((picks(indices) == rule).all(1).sum())}
    try:
        path = os.path.join(tempfile.mkdtemp(prefix="plexrec-onnx-"), "topk.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(TopKIndices(k), (scores,), path, input_names=["scores"], output_names=["v", "i"],
                              dynamic_axes={"scores": {0: "n", 1: "L"}}, opset_version=17, dynamo=False)
        ort_values, ort_indices = ort_session(path).run(None, {"scores": scores.numpy()})
        report["ort_topk_rows_as_rule"] = int((picks(torch.from_numpy(ort_indices)) == rule).all(1).sum())
        report["ort_topk_values_max_diff"] = float(np.abs(ort_values - values.numpy()).max())
    except Exception as exc:  # noqa: BLE001 - reported
        report["ort_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return report


def time_interleaved(runs: dict[str, Callable], inputs: ScoringInputs, repeats: int, windows: int) -> dict[str, float]:
    """Median ms per call over ``windows``; in each window every engine runs ``repeats`` calls, order rotated."""
    names = list(runs)
    per_window: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            for _ in range(3):
                torch.sigmoid(runs[name](inputs))
        for window in range(windows):
            shift = window % len(names)
            for name in names[shift:] + names[:shift]:
                run = runs[name]
                started = time.perf_counter()
                for _ in range(repeats):
                    torch.sigmoid(run(inputs))
                per_window[name].append((time.perf_counter() - started) / repeats * 1e3)
    eager = np.array(per_window[names[0]])
    # the ratio paired by window (the same round of the loop, so the same load on a shared machine)
    return {name: {"median": float(np.median(values)), "p25": float(np.percentile(values, 25)),
                   "p75": float(np.percentile(values, 75)),
                   "paired_ratio": float(np.median(np.array(values) / eager))} for name, values in per_window.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=15)
    parser.add_argument("--skip", default="", help="comma-separated engines not to build")
    parser.add_argument("--out", default=str(ROOT / "bench/results/inference_engines.json"))
    parser.add_argument("--warm-cache", action="store_true",
                        help="let inductor reuse its on-disk caches (default: cold, the compile a fresh host pays)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = not args.warm_cache
    skip = {s for s in args.skip.split(",") if s}

    tables, _, fast, builder, eager_build = build_model()
    items = online_items(tables)
    user = heavy_user(tables)
    catalogue = np.array(sorted(items))
    rng = np.random.default_rng(0)
    inputs = {}
    with torch.inference_mode():
        for n in CANDIDATES:
            chosen = rng.permutation(catalogue)[:n].tolist()
            inputs[n] = builder.batch([(user, [items[i] for i in chosen])], items)
        # exact ties across the k-th place: 10 distinct items repeated over 200 behaviours (equal
        # item and equal position bucket: equal scores)
        tie_user = UserFeatures(user_id=user.user_id, profile=user.profile,
                                history_item_ids=[int(catalogue[i % 10]) for i in range(HISTORY)],
                                interaction_count=HISTORY)
        ties = builder.batch([(tie_user, [items[i] for i in rng.permutation(catalogue)[:100].tolist()])], items)
    assert int(inputs[100].history.lengths[0]) == HISTORY

    one_call = OneCall(fast).eval()
    example = one_call_args(fast, inputs[100])
    runs: dict[str, Callable] = {"eager": eager_forward(fast), "eager_one_call": on_one_call(fast, one_call)}
    builds = {"eager": {"seconds": eager_build, "note": "InferenceRanker + InputBuilder (today's path)"},
              "eager_one_call": {"seconds": 0.0, "note": "OneCall in eager"}}
    for name, build in ENGINES.items():
        if name in skip:
            builds[name] = {"error": "skipped (--skip)"}
            continue
        print(f"building {name} ...", flush=True)
        started = time.perf_counter()
        try:
            with torch.inference_mode(name not in ("aoti", "onnxruntime", "torchscript")):
                run, note = build(fast, one_call, example)
            built = time.perf_counter() - started
            # torch.compile compiles on the first calls: each new shape may compile again
            first = {}
            with torch.inference_mode():
                for n in CANDIDATES:
                    begun = time.perf_counter()
                    run(inputs[n])
                    first[n] = time.perf_counter() - begun
            runs[name] = run
            builds[name] = {"seconds": built + sum(first.values()), "build_seconds": built,
                            "first_call_seconds": {str(n): s for n, s in first.items()}, "note": note}
            print(f"  {builds[name]['seconds']:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - an engine that does not work here is reported, not fatal
            builds[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                            if str(exc).strip() else type(exc).__name__}
            print(f"  failed: {builds[name]['error']}", flush=True)
            traceback.print_exc(limit=3)

    reference = {n: probabilities(runs["eager"], inputs[n]) for n in CANDIDATES}
    tie_reference = probabilities(runs["eager"], ties)
    agreement = {}
    for name, run in runs.items():
        diffs = {str(n): float(np.abs(probabilities(run, inputs[n]) - reference[n]).max()) for n in CANDIDATES}
        diffs["ties"] = float(np.abs(probabilities(run, ties) - tie_reference).max())
        agreement[name] = diffs

    timings = {n: time_interleaved(runs, inputs[n], REPEATS[n], args.windows) for n in CANDIDATES}
    shares = {str(n): topk_share(fast, inputs[n], REPEATS[n]) for n in CANDIDATES}
    tie_rule = topk_tie_rule(fast, ties)

    engines = []
    for name in [*runs, *(n for n in builds if n not in runs)]:
        row = {"engine": name, **builds[name]}
        if name in runs:
            row["ms"] = {str(n): timings[n][name]["median"] for n in CANDIDATES}
            row["ms_window_p25_p75"] = {str(n): [timings[n][name]["p25"], timings[n][name]["p75"]]
                                        for n in CANDIDATES}
            row["ratio_to_eager"] = {str(n): timings[n][name]["paired_ratio"] for n in CANDIDATES}
            row["max_abs_prob_diff"] = agreement[name]
            row["matches_eager"] = all(d <= TOLERANCE for d in agreement[name].values())
        engines.append(row)
    versions = {}
    for package in ("onnxruntime", "onnx"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    report = {"benchmark": "inference_engines", "when": now(), "machine": machine(), "config": CONFIG,
              "packages": {"torch": torch.__version__, **versions}, "load_average": os.getloadavg(),
              "history": HISTORY, "top_k": fast.top_k, "windows": args.windows, "repeats": REPEATS,
              "inductor_caches": "warm" if args.warm_cache else "disabled (cold compile)",
              "probability_spread": {str(n): float(np.ptp(reference[n])) for n in CANDIDATES},
              "tolerance": TOLERANCE, "engines": engines, "eager_topk_share": shares,
              "topk_tie_rule": tie_rule}
    print_table(report)
    write_json(args.out, report)


def print_table(report: dict) -> None:
    print(f"\n{report['machine']}; 1 user, {report['history']}-behaviour history, DARE top_k {report['top_k']}; "
          f"median of {report['windows']} windows; x eager: median of per-window ratios; inductor caches "
          f"{report['inductor_caches']}\n")
    print("| engine | 100 cand. ms | x eager | 1,000 cand. ms | x eager | scores = eager (1e-5) | max diff | "
          "build/compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in report["engines"]:
        if "error" in row:
            print(f"| {row['engine']} | — | — | — | — | — | — | {row['error']} |")
            continue
        ms, ratio = row["ms"], row["ratio_to_eager"]
        print(f"| {row['engine']} | {ms['100']:.3f} | {ratio['100']:.2f} | {ms['1000']:.3f} | {ratio['1000']:.2f} | "
              f"{'yes' if row['matches_eager'] else 'NO'} | {max(row['max_abs_prob_diff'].values()):.1e} | "
              f"{row['seconds']:.1f} |")
    for n, share in report["eager_topk_share"].items():
        print(f"\neager, {n} candidates: aten::topk {share['aten_topk_share']:.0%} of the forward (profiler), "
              f"the whole top_k_mixing {share['top_k_mixing_share']:.0%}; topk alone on [{n}, "
              f"{report['history']}] {share['topk_alone_ms']:.3f} ms; top ops: "
              + ", ".join(f"{o['op']} {o['self_share']:.0%}" for o in share["top_ops"]))
    ties = report["topk_tie_rule"]
    print(f"\ntop-k ties (10 items repeated over the history, 100 candidates): {ties['rows_tied_across_kth']} of "
          f"{ties['rows']} rows tie across the k-th place; plain TopK picks the rule's set in "
          f"{ties['torch_topk_rows_as_rule']} (torch) and {ties.get('ort_topk_rows_as_rule', '—')} (ORT) rows; "
          f"ORT TopK values vs torch max diff {ties.get('ort_topk_values_max_diff', ties.get('ort_error'))}")


if __name__ == "__main__":
    main()
