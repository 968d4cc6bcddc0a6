"""``backward-lens edit``: rewrite one fact, show greedy continuations before and after, revert."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from backward_lens import checks
from backward_lens.batching import eval_mode, pad_id
from backward_lens.commands.common import add_model_arguments, check_model_args, model_from_args
from backward_lens.commands.options import add_json_flag, parse_layers, positive_int
from backward_lens.errors import InputError
from backward_lens.tokens import encode_text

NAME = "edit"
HELP = "rewrite a fact (forward pass shift, ROME, MEMIT, FT) and compare continuations"
DESCRIPTION = """\
Computes an edit (or loads a saved one), prints the greedy continuation of the edit prompt and of
every --paraphrase / --neighborhood prompt before and after the edit, then reverts the model.
--save writes the edit (weight deltas as safetensors + edit.json) to a folder, atomically;
--load applies a saved edit instead of computing one (it refuses an edit made for another model).

Methods: shift (forward pass shift, the paper's method: FF2 += eta * x_n^T e_t, one forward
pass), shift-adaptive (eta chosen per edit: the smallest making the target top-1), rome, memit,
ft / ft-late, ft-early, ft-l (fine-tuning baselines). Unset hyper-parameters take per-model
defaults; any hyper-parameter can be set with --hparam KEY=VALUE (value read as JSON).

Examples:
  backward-lens edit --prompt "The Eiffel Tower is located in the city of" \\
      --subject "Eiffel Tower" --target " Rome" --neighborhood "The Louvre is located in"
  backward-lens edit --method shift --layer 21 --eta 0.5 --target " English" \\
      --prompt "Danielle Darrieux's mother tongue is" --save edits/darrieux
  backward-lens edit --load edits/darrieux --paraphrase "Danielle Darrieux spoke"
  backward-lens edit --method rome --layer 6 --hparam v_steps=25 --subject "Eiffel Tower" \\
      --prompt "The Eiffel Tower is located in the city of" --target " Rome" --json
  (--json prints the JSON alone; --json FILE writes it and prints the text as usual)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add edit's options."""
    p.add_argument("--method", default="shift", help="editing method (default: shift)")
    p.add_argument("--prompt", default=None, help="the edit prompt, subject included")
    p.add_argument(
        "--subject",
        default="",
        help="the subject as it appears in the prompt (required by rome and memit)",
    )
    p.add_argument("--target", default=None, help="the new object, e.g. ' Rome'")
    p.add_argument("--target-true", default=None, help="the current object (recorded only)")
    p.add_argument(
        "--layer",
        default=None,
        metavar="LAYERS",
        help="layer to edit (memit: a list such as 3-7) (default: per model)",
    )
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        metavar="X",
        help="shift step size (shift methods) (default: per model)",
    )
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other hyper-parameter, value read as JSON (repeatable)",
    )
    p.add_argument(
        "--paraphrase",
        action="append",
        default=[],
        metavar="PROMPT",
        help="another wording of the fact; should change too (repeatable)",
    )
    p.add_argument(
        "--neighborhood",
        action="append",
        default=[],
        metavar="PROMPT",
        help="a related fact that should NOT change (repeatable)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=12,
        metavar="N",
        help="continuation length in tokens (default: 12)",
    )
    p.add_argument("--save", metavar="DIR", help="write the edit to this folder")
    p.add_argument("--load", metavar="DIR", help="apply a saved edit instead of computing one")
    add_json_flag(p)
    add_model_arguments(p)


def parse_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """Read ``--hparam KEY=VALUE`` (JSON values), ``--layer`` and ``--eta`` into one dict.

    Raises:
        InputError: an unreadable item, a layer list for a one-layer method, ``--eta`` for a
            method without one, or a value the method refuses.
    """
    hp: dict[str, Any] = {}
    from backward_lens.evaluation.methods import parse_hparam

    for item in args.hparam:  # the one KEY=VALUE syntax, shared with evaluate --method
        key, value = parse_hparam(item, "in --hparam")
        hp[key] = value
    if args.layer is not None:
        layers = parse_layers(args.layer)
        if layers is None:
            raise InputError("--layer needs a layer index (or a list for memit)")
        if args.method == "memit":
            hp["layers"] = layers
        elif len(layers) == 1:
            hp["layer"] = layers[0]
        else:
            raise InputError(f"{args.method} edits one layer; give one --layer")
    if args.eta is not None:
        if not args.method.startswith("shift"):
            raise InputError(f"--eta is a forward pass shift setting; {args.method} has none")
        hp["eta"] = checks.eta("--eta", args.eta)
    checks.hparams(args.method, hp)
    return hp


SUBJECT_METHODS = ("rome", "memit")
"""Methods that locate the subject in the prompt (they refuse to run without one)."""


@dataclass
class Continuation:
    """Greedy continuations of one prompt before and after the edit, and P(target) at its end."""

    kind: str
    prompt: str
    before: str
    after: str
    target_prob_before: float
    target_prob_after: float


@torch.no_grad()
def _greedy(lm: Any, prompt: str, n: int, target: int | None) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` and P(target) after it (eval mode, one encoding)."""
    ids = torch.tensor([encode_text(lm.tokenizer, prompt.rstrip())], device=lm.device)
    with eval_mode(lm.model):
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id(lm.tokenizer),
        )
        p = 0.0
        if target is not None:
            p = float(lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)[target])
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), p


def run(args: argparse.Namespace) -> int:
    """Compute (or load) the edit, print continuations before and after, revert; returns 0.

    Raises:
        InputError: a bad option or hyper-parameter (one line, before the model loads).
    """
    from backward_lens.editing import Edit, RewriteRequest, get_editor
    from backward_lens.editing.base import check_edit_fits, check_save_path

    # Everything the arguments alone can show is checked before the model is loaded.
    checks.nonblank_texts("--paraphrase", args.paraphrase)
    checks.nonblank_texts("--neighborhood", args.neighborhood)
    if args.save is not None:
        check_save_path(args.save)
    json_path: Path | None = None
    if args.json not in (None, "-"):
        json_path = checks.output_files({"--json": args.json})["--json"]
    check_model_args(args)
    edit: Edit | None = None
    hparams: dict[str, Any] = {}
    if args.load:
        edit = Edit.load(args.load)
        if args.prompt is None and edit.requests:
            args.prompt = edit.requests[0].get("prompt")
            args.target = args.target or edit.requests[0].get("target_new")
        editor = None
    else:
        if args.prompt is None or args.target is None:
            raise InputError("give --prompt and --target (or --load a saved edit)")
        request = RewriteRequest(args.prompt, args.subject, args.target, args.target_true)
        hparams = parse_hparams(args)
        if args.method in SUBJECT_METHODS and not args.subject.strip():
            raise InputError(
                f"{args.method} edits at the subject's last token; give --subject (as it "
                "appears in the prompt)"
            )
        editor = get_editor(args.method, **hparams)
    if not isinstance(args.prompt, str) or not args.prompt.strip():
        raise InputError("give --prompt (the saved edit records no prompt)")

    lm = model_from_args(args)
    checks.hparams(args.method, hparams, lm.n_layers)
    if edit is not None:
        check_edit_fits(edit, lm.model)
    seconds = 0.0
    if editor is not None:
        start = time.perf_counter()
        edit = editor(lm, [request])
        seconds = time.perf_counter() - start
    assert edit is not None
    target_id = None
    if args.target:
        from backward_lens.editing.request_tokens import edit_tokens

        target_id = edit_tokens(lm, args.prompt, args.target).first_target
    prompts = (
        [("edit", args.prompt)]
        + [("paraphrase", p) for p in args.paraphrase]
        + [("neighborhood", p) for p in args.neighborhood]
    )
    before = [_greedy(lm, p, args.max_new_tokens, target_id) for _, p in prompts]
    with edit.applied(lm.model):
        after = [_greedy(lm, p, args.max_new_tokens, target_id) for _, p in prompts]
    rows = [
        Continuation(kind, p, b[0], a[0], b[1], a[1])
        for (kind, p), b, a in zip(prompts, before, after, strict=True)
    ]
    if args.save is not None:
        edit.save(args.save)
    result = {
        "model": lm.name,
        "method": edit.method,
        "hparams": edit.hparams,
        "info": {k: v for k, v in edit.info.items() if k not in ("per_request", "losses")},
        "parameters": {k: list(v.shape) for k, v in edit.deltas.items()},
        "seconds": seconds,
        "loaded_from": args.load,
        "saved_to": args.save,
        "target": args.target,
        "continuations": [asdict(r) for r in rows],
    }
    text = json.dumps(result, indent=2, default=str)
    if args.json == "-":  # the JSON alone on stdout
        print(text)
        return 0
    if json_path is not None:
        from backward_lens.io import atomic_write_text

        atomic_write_text(json_path, text + "\n")
    print(format_result(result))
    if json_path is not None:
        print(f"wrote json: {json_path}")
    return 0


def format_result(result: dict[str, Any]) -> str:
    """The edit's result (as printed by ``--json``) as readable text."""
    hp = ", ".join(f"{k}={v}" for k, v in result["hparams"].items())
    source = (
        f"loaded from {result['loaded_from']}"
        if result["loaded_from"]
        else (f"computed in {result['seconds']:.2f} s")
    )
    lines = [f"{result['method']} on {result['model']} ({hp}); {source}"]
    chosen = result["info"].get("eta")
    if result["info"].get("success") is False:
        cap = result["hparams"].get("eta_max")
        lines.append(
            f"even eta_max={cap:.4g} does not make the target top-1: "
            + (
                "edit refused (raise eta_max, or pass on_failure=cap to apply it anyway)"
                if result["info"].get("refused")
                else "applied the cap anyway (on_failure=cap)"
            )
        )
    elif result["method"] == "shift-adaptive" and chosen is not None:
        lines.append(
            f"chosen eta {chosen:.4g} (eta {result['info'].get('eta_lower', 0):.4g} "
            f"does not make the target top-1); {result['info'].get('runs')} re-runs"
        )
    if result["info"].get("skipped"):
        lines.append("the model already predicts the target: nothing was edited")
    lines.append("edited: " + (", ".join(result["parameters"]) or "nothing"))
    for r in result["continuations"]:
        lines += [
            "",
            f"[{r['kind']}] {r['prompt']!r}",
            f"  before: {r['before']!r}   P(target)={r['target_prob_before']:.3f}",
            f"  after:  {r['after']!r}   P(target)={r['target_prob_after']:.3f}",
        ]
    if result["saved_to"]:
        lines += ["", f"saved the edit to {result['saved_to']}"]
    return "\n".join(lines)
