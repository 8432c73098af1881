"""`qkvcomm calibrate codec|layers|pair`: the codec profile, the layer-selection profile, or a
cross-model alignment, fitted on the bundled samples or on --data."""
from __future__ import annotations

import argparse
from pathlib import Path

from qkv_core.config import DEFAULT_MODEL
from qkvcomm_cli.commands.common import runtime, runtime_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate a codec profile (`codec`), a layer-selection profile (`layers`) "
                       "or a cross-model alignment (`pair`, implied by --sender-model)")
    p.add_argument("what", nargs="?", choices=["codec", "layers", "pair"])
    p.add_argument("--sender-model", help="pair: the model whose cards the receiver model will take")
    p.add_argument("--receiver-model", help="pair: the receiver's model (default smollm2-135m)")
    p.add_argument("--method", default="stats,ridge", help="pair: alignments to fit, of stats and ridge")
    p.add_argument("--data", type=Path,
                   help="JSONL of calibration rows (context; for layers also question, answers); default: bundled")
    p.add_argument("--context-field", default="context")
    p.add_argument("--limit", type=int, default=8, help="calibration rows taken from --data")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per calibration text")
    p.add_argument("--out", type=Path,
                   help="profile file (default: the model's profile in the cache, used by the sender)")
    p.add_argument("--tools", default="", help="codec: the lossy tools every measured codec has, e.g. +rot+prerope "
                   "(the profile budget-B+rot+prerope reads); default none")
    p.add_argument("--allocate", help="also write this adaptive codec's allocation, e.g. budget-3 or seed-adaptive")
    p.add_argument("--tokens", type=int, default=1024, help="context length the --allocate budget is met at")
    p.add_argument("--codec-out", type=Path, default=Path("codec.json"),
                   help="where --allocate writes (usable as --codec)")
    p.add_argument("--reuse", action="store_true",
                   help="codec, layers: keep the profile the sender would read (saved in the cache, or shipped "
                   "for the embedded model) and measure only where there is none")
    runtime_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv_core import bundled  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415
    from qkv_eval.evaluate import load_rows  # noqa: PLC0415

    what = args.what or ("pair" if args.sender_model else None)
    if what is None:
        raise SystemExit("calibrate what? codec, layers, or pair (--sender-model A --receiver-model B)")
    if args.data:
        samples = bundled.from_rows(list(load_rows(args.data, args.limit)), args.context_field)
    else:
        samples = bundled.samples()
    if what == "pair":
        return _calibrate_pair(args, [context for context, _, _ in samples])
    if args.reuse and (args.data or args.out):
        raise SystemExit("--reuse keeps the profile the sender reads, on the bundled samples; it takes no --data or "
                         "--out")
    lm = load_model(runtime(args))
    return (_calibrate_layers if what == "layers" else _calibrate_codec)(args, lm, samples)


def _calibrate_pair(args: argparse.Namespace, texts: list[str]) -> int:
    from qkv_core.engine import crossmodel  # noqa: PLC0415
    from qkv_core.model.loading import load_model  # noqa: PLC0415

    if not args.sender_model:
        raise SystemExit("calibrate pair needs --sender-model (and --receiver-model, default smollm2-135m)")
    sender = load_model(runtime(args, args.sender_model))
    receiver = load_model(runtime(args, args.receiver_model or DEFAULT_MODEL))
    shape = [f"{lm.fingerprint.name} ({lm.num_layers} layers, {lm.fingerprint.num_kv_heads}x{lm.fingerprint.head_dim})"
             for lm in (sender, receiver)]
    print(f"{shape[0]} -> {shape[1]} on {len(texts)} texts")
    for method in args.method.split(","):
        alignment = crossmodel.fit(sender, receiver, texts, method, args.max_tokens)
        out = alignment.save(args.out if args.out and "," not in args.method else alignment.default_path())
        print(f"{method}: receiver layer <- sender layer {alignment.sources} -> {out}")
    return 0


def _calibrate_codec(args: argparse.Namespace, lm, samples) -> int:  # noqa: ANN001
    from qkv_core.codec import allocation  # noqa: PLC0415
    from qkv_core.codec.registry import adaptive, save_layers  # noqa: PLC0415
    from qkv_core.engine import calibration  # noqa: PLC0415

    kind = adaptive(args.allocate) if args.allocate else None
    if args.allocate and (kind is None or kind.needs_probe or kind.entropy):
        raise SystemExit("--allocate takes seed-adaptive or budget-B[+rot][+prerope] (tokenmix depends on each "
                         "context's attention, +zstd on its values)")
    if kind is not None and len(kind.profile_sets) > 1:
        raise SystemExit(f"--allocate {args.allocate} reads {len(kind.profile_sets)} profiles "
                         f"({', '.join(t or 'plain' for t in kind.profile_sets)}): calibrate each with --tools")
    tools = kind.profile_tools if kind else args.tools
    if args.tools and args.tools != tools:
        raise SystemExit(f"--allocate {args.allocate} reads a profile calibrated with {tools or 'no tools'}, not "
                         f"{args.tools}")
    if args.reuse:
        profile, out = calibration.load_or_calibrate(lm, tools=tools), "kept or made as the sender reads it"
    else:
        profile = calibration.calibrate(lm, samples, args.max_tokens, tools)
        out = args.out or allocation.Profile.path_for(lm.fingerprint, None, tools)
        profile.save(out)
    print(f"profile{tools} of {lm.fingerprint.name} on {profile.texts} samples ({profile.tokens} tokens) -> {out}")
    print("| layer | " + " | ".join(f"K{b}/V{b}" for b in allocation.BITS)
          + " | dropped |  (KIVI: next-token KL, nats, one tensor quantized or one layer dropped)")
    print("|---|" + "---|" * (len(allocation.BITS) + 1))
    for i in range(profile.num_layers):
        kl = profile.sensitivity
        dropped = f"{profile.dropped[i]:.4f}" if profile.dropped else "-"
        cells = " | ".join(f"{kl['key'][str(b)][i]:.4f}/{kl['value'][str(b)][i]:.4f}" for b in allocation.BITS)
        print(f"| {i} | {cells} | {dropped} |")
    if kind is not None:
        shapes = [(lm.fingerprint.num_kv_heads, args.tokens, lm.fingerprint.head_dim)] * lm.num_layers
        layers = allocation.budget([profile], kind,
                                   shapes).layers if kind.allocator == "budget" else allocation.seed_adaptive(profile)
        save_layers(args.codec_out, layers, note=f"{args.allocate} for {lm.fingerprint.name} at {args.tokens} tokens")
        print(f"{args.allocate} at {args.tokens} tokens -> {args.codec_out} (use it as --codec {args.codec_out})")
    return 0


def _calibrate_layers(args: argparse.Namespace, lm, samples) -> int:  # noqa: ANN001
    from qkv_core.engine import selection  # noqa: PLC0415

    if args.reuse:
        profile, out = selection.load_or_calibrate(lm), "kept or made as the sender reads it"
    else:
        profile = selection.calibrate(lm, samples)
        out = args.out or selection.LayerProfile.default_path(lm.fingerprint)
        profile.save(out)
    print(f"layer profile of {lm.fingerprint.name} on {profile.samples} samples -> {out}")
    print("| layer | attention mass | leave-one-out (nats) |\n|---|---|---|")
    for i, (a, d) in enumerate(zip(profile.attention, profile.loo)):
        print(f"| {i} | {a:.4f} | {d:.3f} |")
    return 0
