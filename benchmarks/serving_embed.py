"""`scripts/bench --only embed`: Embed throughput on short texts, the daemon with its
defaults against one text per decode.

Short texts are Banking77 questions (about 10-20 tokens), each request carrying one text,
distinct within a load run (nothing caches Embed replies). The daemon serves 1 and 8
closed-loop clients; concurrent requests share decodes (`sidecar/worker/embed.py`). The
reference is what Embed did before it batched: `llama_cpp.Llama.embed`, one text per
llama_decode, in this process with every core's thread, the texts one after another. The
two take turns, so load drifting over the run hits both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from benchmarks.common import Log
from benchmarks.serving_measure import load_test
from benchmarks.serving_workload import BATCH, short_texts

if TYPE_CHECKING:
    from benchmarks.serving import Bench

log = Log("bench")
CLIENTS = (1, 8)
TARGET_RATIO_8 = 4.0  # the bar: short texts/s at 8 clients, 4x one text per decode


def run_embed(bench: Bench) -> None:
    import llama_cpp

    bench.mark("embed short texts")
    texts = short_texts(bench.a.data, 3000)
    d = bench.daemon(None, None)
    cores = len(os.sched_getaffinity(0))
    ref: Any = llama_cpp.Llama(model_path=str(bench.a.model), embedding=True, n_ctx=BATCH,
                               n_batch=BATCH, n_ubatch=BATCH, n_threads=cores,
                               n_threads_batch=cores, verbose=False)  # fmt: skip
    out: dict[str, Any] = {
        "reference": f"llama_cpp.Llama.embed, one text per decode, {cores} threads"
    }
    with ExitStack() as stack:
        stack.callback(ref.close)

        def make(_i: int) -> Callable[[str], int]:
            c = stack.enter_context(d.client())
            return lambda text: len(c.embed([text]).embeddings)

        def one_by_one(_i: int) -> Callable[[str], int]:
            return lambda text: len(ref.embed([text]))

        load_test(make, 8, 1.0, texts)  # warm-up: both workers have embedded
        load_test(one_by_one, 1, 1.0, texts)
        for n in CLIENTS:
            for name, maker, clients in (
                ("daemon", make, n),
                ("one_text_per_decode", one_by_one, 1),
            ):
                r = load_test(maker, clients, bench.load_seconds, texts)
                out.setdefault(name, {})[str(n)] = {
                    "texts_per_s": r.get("req_s"),
                    "errors": r.get("errors"),
                }
    for n in CLIENTS:
        rate = out["daemon"][str(n)]["texts_per_s"] or 0.0
        ref_rate = out["one_text_per_decode"][str(n)]["texts_per_s"]
        out["daemon"][str(n)]["ratio_vs_one_text_per_decode"] = (
            round(rate / ref_rate, 2) if ref_rate else None
        )
        log(f"embed {n} client(s): daemon {rate} texts/s, one text per decode {ref_rate} texts/s")
    out["target_ratio_8_clients"] = TARGET_RATIO_8
    bench.res["embed_short"] = out
