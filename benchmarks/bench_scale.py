"""Scale-out measurements (issue 12). Not a test: it asserts nothing; it prints what it measured.

    .venv/bin/python benchmarks/bench_scale.py workers [--records 48]
    .venv/bin/python benchmarks/bench_scale.py explain [--sizes S,S] [--tokens 16,64] [--skip-tl]

workers  `evaluate` (unedited + shift, SmolLM2-135M) and `study rank` on the first N CounterFact
         records with Ray --workers 1 and --workers 2 (1 torch thread per worker), and in one
         plain process with 1 torch thread: records/s of the compute, and Ray's start-up (cluster
         + actors loading the model). Ratios are taken within this one run.
explain  `explain` (capture + lens) on randomly initialised models built from real configs:
         GPT-2 small, medium, large, xl (float32) and Llama-2-7B (bfloat16, run last and only if
         18 GiB are available), next to TransformerLens 4.3 `run_with_cache(incl_bwd=True)` on
         the same model (GPT-2 family; `pip install transformer-lens==4.3.0`). Each size runs in
         its own subprocess; peak resident memory is the kernel's high-water mark (VmHWM),
         reset after the model is built, so it is the model plus what the call needs at its
         peak; seconds are the median of 2 calls after a warm-up (models over 1B parameters:
         one cold call, building the lens's float32 unembedding included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit_format" / "counterfact-edit.json"
PROMPT = (
    "The Eiffel Tower, built in 1889 for the World's Fair, is located in the city of Paris, "
    "which is also known for the Louvre, the Seine and its many cafes and bridges. "
)

SIZES: dict[str, dict[str, Any]] = {
    "gpt2-small": {"family": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {"family": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"family": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"family": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25},
    "llama2-7b": {
        "family": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
}
"""Published configs (GPT-2: OpenAI's four sizes, 1024 positions; Llama-2-7B: Meta's)."""


def load() -> str:
    """The 1-minute load average and what ``uptime`` says."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def mem_available_gib() -> float:
    """The kernel's ``MemAvailable`` in GiB (0.0 if ``/proc/meminfo`` does not say)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# ------------------------------------------------------------------------------------------
# workers


def bench_workers(n: int, data: Path) -> None:
    """Print the ``workers`` measurements (see the module docstring) on the first ``n`` records."""
    import torch

    from backward_lens.data import load_records
    from backward_lens.distributed.ray_backend import Cluster, ModelSpec, RayStudy, evaluate_ray
    from backward_lens.evaluation import EvalSettings, evaluate
    from backward_lens.models import load_model
    from backward_lens.study import run_study

    records = load_records(data, limit=n)
    settings = EvalSettings(batch_size=16, group_size=4, fluency_records=0, ppl_records=0)
    methods = ["unedited", "shift"]
    spec = ModelSpec("smollm2-135m")
    print(f"load before: {load()}")
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}

    class Timed(RayStudy):
        """RayStudy that notes when its compute starts and its last line is written."""

        marks: dict[str, float]

        def compute(self, exp: Any, pending: Any, done: Any, options: Any,
                    write: Any, progress: bool) -> None:  # fmt: skip
            self.marks = {"startup": self.startup_seconds or 0.0, "t0": time.perf_counter()}

            def timed_write(r: Any) -> None:
                write(r)
                self.marks["t1"] = time.perf_counter()

            super().compute(exp, pending, done, options, timed_write, progress)

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model("smollm2-135m")
        t0 = time.perf_counter()
        evaluate(lm, records, methods, Path(tmp) / "one", settings=settings, progress=False)
        results["evaluate, one process"] = {"compute": time.perf_counter() - t0, "startup": 0}
        t0 = time.perf_counter()
        run_study("rank", data, model=lm, n=n, out=Path(tmp) / "s1", batch_size=8, progress=False)
        results["study, one process"] = {"compute": time.perf_counter() - t0, "startup": 0}
        del lm
        for workers in (1, 2):
            marks: dict[str, float] = {}

            def started(pool: Any, marks: dict[str, float] = marks) -> None:
                marks["startup"] = pool.startup_seconds
                marks["t0"] = time.perf_counter()

            def row(_: Any, marks: dict[str, float] = marks) -> None:
                marks["t1"] = time.perf_counter()

            evaluate_ray(
                spec,
                records,
                methods,
                Path(tmp) / f"ray{workers}",
                cluster=Cluster(workers=workers),
                settings=settings,
                on_pool=started,
                on_result=row,
                progress=False,
            )
            results[f"evaluate, Ray --workers {workers}"] = {
                "compute": marks["t1"] - marks["t0"],
                "startup": marks["startup"],
            }
            run_study(
                "rank",
                data,
                model="smollm2-135m",
                n=n,
                out=Path(tmp) / f"s-ray{workers}",
                batch_size=8,
                progress=False,
                executor=(timed := Timed(spec, Cluster(workers=workers), chunk=8)),
            )
            results[f"study, Ray --workers {workers}"] = {
                "compute": timed.marks["t1"] - timed.marks["t0"],
                "startup": timed.marks["startup"],
            }
    print(f"load after: {load()}")
    print(f"{n} records; evaluate: unedited + shift, batch 16, groups of 4; study: rank, batches 8")
    print("| run | compute (s) | records/s | Ray start-up (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['compute']:.1f} | {n / r['compute']:.2f} | {r['startup']:.1f} |")
    for what in ("evaluate", "study"):
        one = results[f"{what}, Ray --workers 1"]["compute"]
        two = results[f"{what}, Ray --workers 2"]["compute"]
        plain = results[f"{what}, one process"]["compute"]
        print(
            f"{what}: records/s --workers 2 / --workers 1 = {one / two:.2f}; "
            f"--workers 1 / one process = {plain / one:.2f}"
        )


# ------------------------------------------------------------------------------------------
# explain on random models of growing size


def _build(size: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, dtype) of a randomly initialised model of ``size``."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT))
    from tests.tokenizers import real_tokenizer

    spec = dict(SIZES[size])
    family = spec.pop("family")
    torch.manual_seed(0)
    if family == "gpt2":
        tok = real_tokenizer("gpt-2")
        config = tf.GPT2Config(vocab_size=50257, n_positions=1024, **spec)
        return tf.GPT2LMHeadModel(config).eval(), tok, torch.float32
    tok = real_tokenizer("llama-spm")
    config = tf.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **spec)
    torch.set_default_dtype(torch.bfloat16)  # never materialise 7B parameters in float32
    try:
        model = tf.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model, tok, torch.bfloat16


def _prompt(tok: Any, tokens: int) -> str:
    ids = tok(PROMPT * 40, add_special_tokens=False)["input_ids"][: tokens - 1]
    return str(tok.decode(ids))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def one_size(size: str, tokens: list[int], tool: str) -> None:
    """Child process: build ``size``, then time and measure each prompt length; print JSON."""
    import statistics

    import torch

    t0 = time.perf_counter()
    model, tok, dtype = _build(size)
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"size": size, "tool": tool, "params": params, "dtype": str(dtype)}
    out["build_s"] = build
    out["runs"] = []
    if tool == "ours":
        from backward_lens.explain import explain
        from backward_lens.models import wrap

        lm = wrap(model, tok, size)

        def call(prompt: str) -> Any:
            return explain(lm, prompt, " Rome")

    else:
        import copy  # noqa: F401  (the bridge takes the model itself: no copy, to fit)

        from transformer_lens.model_bridge import TransformerBridge

        with tempfile.TemporaryDirectory() as folder:
            model.config.save_pretrained(folder)
            tok.save_pretrained(folder)
            bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tok)
        n_layers = len(model.transformer.h)
        wanted = {
            f"blocks.{i}.mlp.{m}.hook_{s}"
            for i in range(n_layers)
            for m in ("in", "out")
            for s in ("in", "out")
        }

        def call(prompt: str) -> Any:
            ids = torch.tensor([tok(prompt + " Rome")["input_ids"]])
            return bridge.run_with_cache(
                ids, incl_bwd=True, return_type="loss", names_filter=lambda n: n in wanted
            )

    for n in tokens:
        prompt = _prompt(tok, n)
        n_real = len(tok(prompt + " Rome")["input_ids"])
        before = _rss_kib("VmRSS")
        _reset_peak()
        big = params > 1e9  # minutes a call on 2 cores: one cold call, lens set-up included
        if not big:
            call(prompt)  # warm-up (also the first peak)
        times = []
        for _ in range(1 if big else 2):
            t1 = time.perf_counter()
            result = call(prompt)
            times.append(time.perf_counter() - t1)
            del result
        peak = _rss_kib("VmHWM")
        out["runs"].append(
            {
                "tokens": n_real,
                "seconds": statistics.median(times),
                "rss_before_gib": before / 2**20,
                "peak_gib": peak / 2**20,
            }
        )
    print("RESULT " + json.dumps(out))


def bench_explain(sizes: list[str], tokens: list[int], tl: bool) -> None:
    """Print the ``explain`` measurements for each size in ``sizes`` (one subprocess per tool).

    Args:
        sizes: keys of :data:`SIZES`; Llama-2-7B runs only with 18 GiB available.
        tokens: prompt lengths to time (Llama-2-7B: the first only).
        tl: also time TransformerLens on the GPT-2 sizes.
    """
    rows = []
    print(f"load before: {load()}")
    for size in sizes:
        need = 18.0 if size == "llama2-7b" else 0.0
        avail = mem_available_gib()
        if avail < need:
            print(f"{size}: not run, {avail:.1f} GiB available (needs {need:.0f} GiB)")
            continue
        tools = ["ours"] + (["tl"] if tl and SIZES[size]["family"] == "gpt2" else [])
        for tool in tools:
            cmd = [sys.executable, __file__, "_one", "--size", size, "--tool", tool]
            cmd += ["--tokens", ",".join(map(str, tokens if size != "llama2-7b" else tokens[:1]))]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                tail = done.stderr.strip().splitlines()[-3:]
                print(f"{size} {tool}: failed ({done.returncode}): {' / '.join(tail)}")
                continue
            r = json.loads(line[0][len("RESULT ") :])
            r["wall_s"] = wall
            rows.append(r)
            for run in r["runs"]:
                print(
                    f"{size:12s} {tool:4s} {r['params'] / 1e9:5.2f} B {r['dtype']:14s} "
                    f"{run['tokens']:4d} tok  {run['seconds']:8.2f} s  model RSS "
                    f"{run['rss_before_gib']:6.2f} GiB  peak {run['peak_gib']:6.2f} GiB",
                    flush=True,
                )
    print(f"load after: {load()}")
    print("JSON " + json.dumps(rows))


def main() -> None:
    """Parse the command line and run one measurement (``_one`` is the per-size subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("workers")
    w.add_argument("--records", type=int, default=48)
    w.add_argument("--data", type=Path, default=DATA)
    e = sub.add_parser("explain")
    e.add_argument("--sizes", default=",".join(SIZES))
    e.add_argument("--tokens", default="16,64")
    e.add_argument("--skip-tl", action="store_true")
    o = sub.add_parser("_one")
    o.add_argument("--size", required=True)
    o.add_argument("--tool", default="ours")
    o.add_argument("--tokens", default="32")
    args = parser.parse_args()
    if args.what == "workers":
        bench_workers(args.records, args.data)
    elif args.what == "explain":
        tokens = [int(t) for t in args.tokens.split(",")]
        bench_explain(args.sizes.split(","), tokens, not args.skip_tl)
    else:
        one_size(args.size, [int(t) for t in args.tokens.split(",")], args.tool)


if __name__ == "__main__":
    main()
