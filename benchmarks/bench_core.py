"""Core performance, as ratios measured in one run (issue 2). Not a test: it asserts nothing.

    .venv/bin/python benchmarks/bench_core.py [--repeat 7] [--skip-load] [--skip-tl]

(a) capture of every layer's FF1/gate/FF2 factors (forward + backward) / one no_grad forward
(b) dense route (loss.backward() into every MLP weight's .grad, as the paper's code) / capture
(c) rank() from factors vs torch.linalg.matrix_rank on the dense matrices (and agreement)
(d) projecting the whole (matrix x layer x position) grid with top/bottom-k and target ranks /
    one bare matmul of the same shapes
(e) first load of the default model (GGUF dequantisation) / second load (conversion cache)
(f) TransformerLens 4.3 run_with_cache(incl_bwd=True) on a random GPT-2-small / our capture
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable

import torch

from backward_lens.capture import capture_requests
from backward_lens.models import LensModel, load_model, wrap
from backward_lens.tokens import encode_request
from timing import median_time

PROMPT = "The Eiffel Tower, built in 1889 for the World's Fair, is located in the city of"


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """:func:`timing.median_time` with 2 warm-up runs by default (seconds)."""
    return median_time(fn, repeat, warmup)


def bench_capture(lm: LensModel, repeat: int) -> None:
    """Print ratios (a)-(d) for ``lm`` on :data:`PROMPT` (see the module docstring)."""
    request = encode_request(lm.tokenizer, PROMPT, " Rome")
    ids = torch.tensor([request.input_ids])
    print(f"model {lm.name}, prompt of {len(request.input_ids)} tokens, {lm.n_layers} layers")

    def forward() -> None:
        with torch.no_grad():
            lm.model(ids)

    def ours() -> object:
        return capture_requests(lm, [request])[0]

    mlp = {
        lm.arch.resolve(layer, name).weight
        for layer in range(lm.n_layers)
        for name in lm.arch.matrix_names()
    }

    def dense_route() -> None:
        for p in lm.model.parameters():
            p.requires_grad_(p in mlp)
        try:
            logp = lm.model(ids).logits[0, -1].log_softmax(-1)
            (-logp[request.target_ids[0]]).backward()
            grads = [w.grad for w in mlp]
            assert all(g is not None for g in grads)
        finally:
            for p in lm.model.parameters():
                p.grad = None
                p.requires_grad_(False)

    t_fwd = timed(forward, repeat)
    t_cap = timed(ours, repeat)
    t_dense = timed(dense_route, repeat)
    print(
        f"(a) capture / forward           = {t_cap / t_fwd:6.2f}   "
        f"({t_cap * 1e3:.1f} ms / {t_fwd * 1e3:.1f} ms)   goal <= 1.8"
    )
    print(
        f"(b) dense route / capture       = {t_dense / t_cap:6.2f}   "
        f"({t_dense * 1e3:.1f} ms)   goal >= 1.5"
    )

    cap = ours()
    grads = [g for gs in cap.gradients.values() for g in gs]  # type: ignore[attr-defined]
    dense = [g.dense() for g in grads]
    t_ours = timed(lambda: [g.rank() for g in grads], repeat=3, warmup=1)
    t_ref = timed(lambda: [torch.linalg.matrix_rank(d) for d in dense], repeat=3, warmup=1)
    ours_r = [g.rank() for g in grads]
    ref_r = [int(torch.linalg.matrix_rank(d)) for d in dense]
    same = sum(a == b for a, b in zip(ours_r, ref_r, strict=True))
    print(
        f"(c) matrix_rank(dense) / rank() = {t_ref / t_ours:6.1f}x  "
        f"({len(grads)} matrices, {same}/{len(grads)} identical ranks)   goal >= 50x"
    )

    vectors = torch.cat(
        [cap.stack("ff1", "x").flatten(0, 1), cap.stack("ff2", "delta").flatten(0, 1)]  # type: ignore[attr-defined]
    )
    unembed = lm.arch.unembedding()[0]
    target = request.target_ids[0]
    t_proj = timed(lambda: lm.lens.project(vectors, k=5, target=target), repeat)
    t_mm = timed(lambda: vectors @ unembed.T, repeat)
    print(
        f"(d) grid projection / matmul    = {t_proj / t_mm:6.2f}   "
        f"({vectors.shape[0]} vectors x {unembed.shape[0]} tokens: {t_proj * 1e3:.1f} ms vs "
        f"{t_mm * 1e3:.1f} ms)   goal <= 1.5"
    )


def bench_load() -> None:
    """Print (e): the first load of SmolLM2-135M (GGUF conversion) over a cached one.

    The conversion cache is a temporary folder (``BACKWARD_LENS_CACHE``), restored afterwards.
    """
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("BACKWARD_LENS_CACHE")
        os.environ["BACKWARD_LENS_CACHE"] = tmp
        try:
            start = time.perf_counter()
            load_model("smollm2-135m")
            first = time.perf_counter() - start
            start = time.perf_counter()
            load_model("smollm2-135m")
            second = time.perf_counter() - start
        finally:
            if old is None:
                del os.environ["BACKWARD_LENS_CACHE"]
            else:
                os.environ["BACKWARD_LENS_CACHE"] = old
    print(
        f"(e) first (GGUF) / cached load  = {first / second:6.1f}x  "
        f"({first:.1f} s vs {second:.2f} s)"
    )


def bench_transformer_lens(tokenizer: object, repeat: int) -> None:
    """Print (f): TransformerLens's ``run_with_cache(incl_bwd=True)`` time over our capture.

    Both run on the same random GPT-2 small; skipped with a note if ``transformer_lens`` is not
    installed.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("(f) skipped: pip install transformer-lens==4.3.0 to compare with TransformerLens")
        return
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = tf.GPT2LMHeadModel(config).eval()
    lm = wrap(model, tokenizer, "gpt2-small-random")
    request = encode_request(tokenizer, PROMPT, " Rome")
    ids = torch.tensor([request.input_ids])
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
        # TransformerLens swaps the model's modules for its own bridges: give it a copy
        bridge = TransformerBridge.boot_transformers(
            folder, hf_model=copy.deepcopy(model), tokenizer=tokenizer
        )
    wanted = {
        f"blocks.{i}.mlp.{m}.hook_{s}"
        for i in range(12)
        for m in ("in", "out")
        for s in ("in", "out")
    }

    def tl() -> None:
        bridge.run_with_cache(
            ids, incl_bwd=True, return_type="loss", names_filter=lambda n: n in wanted
        )

    def ours() -> None:
        capture_requests(lm, [request])

    t_tl = timed(tl, repeat)
    t_ours = timed(ours, repeat)
    print(
        f"(f) TransformerLens / capture   = {t_tl / t_ours:6.2f}   "
        f"({t_tl * 1e3:.1f} ms vs {t_ours * 1e3:.1f} ms, random GPT-2 small)   goal >= 2"
    )


def main() -> None:
    """Parse the command line and print every benchmark's ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-load", action="store_true", help="skip (e), which converts again")
    parser.add_argument("--skip-tl", action="store_true", help="skip (f)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lm = load_model("smollm2-135m")
    bench_capture(lm, args.repeat)
    if not args.skip_load:
        bench_load()
    if not args.skip_tl:
        bench_transformer_lens(lm.tokenizer, args.repeat)


if __name__ == "__main__":
    main()
