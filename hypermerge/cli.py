"""The ``hypermerge`` command: a thin click layer over the library.

Each command parses its options, calls one library function and prints what it wrote. A
``HypermergeError`` becomes one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. ``--debug`` (or ``HYPERMERGE_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from hypermerge._optional import missing_dependency
from hypermerge._version import __version__
from hypermerge.errors import HypermergeError


class _UserError(click.ClickException):
    def __init__(self, error: HypermergeError):
        super().__init__(error.one_line())
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"hypermerge: error: {self.message}", err=True)


# commands whose missing torch/transformers is best installed with another extra than [export]
_COMMAND_EXTRAS = {"train": "train"}


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            try:
                return super().invoke(ctx)
            except ModuleNotFoundError as exc:
                # an optional dependency this command needs (torch in a serve-only install)
                command = ctx.invoked_subcommand
                error = missing_dependency(exc, f"hypermerge {command}", _COMMAND_EXTRAS.get(command))
                if error is None:
                    raise
                raise error from exc
        except HypermergeError as error:
            if ctx.meta.get("hypermerge.debug") or os.environ.get("HYPERMERGE_DEBUG") == "1":
                raise
            raise _UserError(error) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hypermerge")
@click.option("--debug", is_flag=True, help="Show full tracebacks (for bug reports).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune with adapters, fold them into dense weights, export verified engines."""
    ctx.meta["hypermerge.debug"] = debug


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
DTYPE_CHOICES = click.Choice(["auto", "float32", "float16", "bfloat16"])


@cli.command()
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path),
              help="Adapter checkpoint directory (hypermerge or PEFT).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path), default=None,
              help="Base model directory [default: the one recorded in the adapter].")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--dtype", type=DTYPE_CHOICES, default="auto", show_default=True,
              help="Output dtype of floating tensors (auto keeps the base's).")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Largest output shard, e.g. 2GB or 500MiB [default: keep the base's sharding].")
@click.option("--verify", is_flag=True,
              help="Compare the folded model with the adapter model on sample inputs (loads both models).")
@click.option("--tolerance", type=float, default=None,
              help="Largest relative difference --verify accepts [default: 1e-4 float32, 1e-2 float16, 5e-2 bfloat16].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--allow-other-base", is_flag=True,
              help="Fold even if the base's content differs from the adapter's record of its base (recorded).")
@quiet_option
def fold(adapter_dir: Path, base_dir: Path | None, out_dir: Path, dtype: str, max_shard_size: str | None,
         verify: bool, tolerance: float | None, overwrite: bool, allow_other_base: bool, quiet: bool) -> None:
    """Fold an adapter (hypermerge or PEFT) into its base: a dense HF model directory, streamed one
    tensor at a time."""
    from hypermerge.fold import fold_checkpoint

    result = fold_checkpoint(adapter_dir, out_dir, base=base_dir, dtype=dtype, overwrite=overwrite,
                             progress=not quiet, max_shard_size=max_shard_size, verify=verify, tolerance=tolerance,
                             allow_other_base=allow_other_base)
    click.echo(f"folded {result.folded} weights ({result.method}) into {result.out} "
               f"({result.shards} shard{'s' if result.shards != 1 else ''}) in {result.seconds:.1f} s")
    if result.base_check is not None:
        click.echo(f"base: {result.base_check.detail}")
    if result.verify is not None:
        report = result.verify
        click.echo(f"verified: max abs difference {report['max_abs']:.3g}, max relative {report['max_rel']:.3g} "
                   f"(tolerance {report['tolerance']:.3g})")


@cli.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", type=click.Path(path_type=Path), default=None,
              help="Base model directory, for the parameter ratio [default: the recorded one].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(adapter_dir: Path, base_dir: Path | None, as_json: bool) -> None:
    """Describe an adapter checkpoint: method, targets, trainable parameters, ratio to the base."""
    from hypermerge.inspect import inspect_adapter

    summary = inspect_adapter(adapter_dir, base=base_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"method               {summary['method']}")
    click.echo(f"config               {json.dumps(summary['config'])}")
    click.echo(f"base model           {summary['base_model']}")
    click.echo(f"base content         {summary['base_content']}")
    click.echo(f"targets              {summary['targets']} ({', '.join(summary['target_suffixes'])})")
    click.echo(f"trainable parameters {summary['trainable_parameters']:,}")
    if "base_parameters" in summary:
        click.echo(f"base parameters      {summary['base_parameters']:,}")
        click.echo(f"ratio                {summary['trainable_ratio']:.4%}")
    if "rank_pattern" in summary:
        ranks = summary["rank_pattern"]
        click.echo(f"rank pattern         total {sum(ranks.values())} over {len(ranks)} matrices")
        for name, rank in ranks.items():
            click.echo(f"  {rank:4d}  {name}")


def _latency_options(func):
    for option in reversed([
        click.option("--batch", type=int, default=None, help="Latency batch size [default: 8 encoders, 1 causal LMs]."),
        click.option("--seq", type=int, default=None, help="Latency sequence length [default: 64]."),
        click.option("--threads", type=int, default=None, help="Threads for torch and onnxruntime alike "
                     "[default: torch's]."),
        click.option("--iters", type=int, default=30, show_default=True, help="Interleaved latency runs."),
        click.option("--provider", default="auto", show_default=True,
                     help="onnxruntime provider: auto (TensorRT EP > CUDA EP > CPU), cpu, cuda, tensorrt."),
        click.option("--atol", type=float, default=1e-4, show_default=True,
                     help="Parity: absolute tolerance, times max(1, the output's largest |value|)."),
        click.option("--rtol", type=float, default=1e-3, show_default=True, help="Parity: relative tolerance."),
    ]):
        func = option(func)
    return func


# export options that a profile (export/*.yaml) may also set: CLI parameter -> profile key
_PROFILE_OPTIONS = {"opset": "opset", "optimize": "optimize", "quantize": "quantize", "block_size": "block_size",
                    "accuracy_level": "accuracy_level", "trt": "trt", "shapes": "shapes",
                    "adapter_inputs": "adapter_inputs", "batch": "batch", "seq": "seq", "threads": "threads",
                    "iters": "iters", "provider": "provider", "atol": "atol", "rtol": "rtol"}


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--profile", default=None, metavar="NAME|PATH",
              help="Export profile: a name from export/ (ort-cpu-int8, ort-cpu-int4-decode, trt-fp16...) or a YAML "
                   "file; options given here override it.")
@click.option("--task", default="auto", show_default=True,
              help="auto (from config.architectures), feature-extraction, sequence-classification, causal-lm.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--optimize", is_flag=True, help="onnxruntime's transformer optimizer (fusions); parity re-checked.")
@click.option("--quantize", default=None, metavar="int8|int4|fp16",
              help="Also write a quantized model beside model.onnx (fp32), kept only if faster and within its "
                   "accuracy bound: int8 (encoders: dynamic; causal LMs: weight-only), int4 (causal LMs, "
                   "weight-only, for decoding) or fp16 (the graph in float16, for onnxruntime's CUDA provider).")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="Weight-only quantization (causal LMs): weights per scale.")
@click.option("--accuracy-level", type=int, default=4, show_default=True,
              help="Weight-only quantization: MatMulNBits compute type (4: int8 activations, fastest on CPU; 1: fp32).")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (needs tensorrt and a CUDA GPU).")
@click.option("--fp16", is_flag=True, help="TensorRT engine in fp16.")
@click.option("--bf16", is_flag=True, help="TensorRT engine in bf16.")
@click.option("--shapes", default=None, metavar="MIN:OPT:MAX",
              help="TensorRT profile: BxS each (BxSxP for causal LMs, P = past length).")
@click.option("--no-verify", is_flag=True, help="Skip the parity and latency checks.")
@click.option("--adapter-inputs", is_flag=True,
              help="HyperAdapt row/column scales of every block linear layer as one graph input (adapter_scales, "
                   "default ones), so one model serves many adapters chosen per request.")
@_latency_options
@click.option("--triton-repo", type=click.Path(path_type=Path), default=None,
              help="Also write a Triton model repository here (as `hypermerge triton` with its defaults).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@quiet_option
@click.pass_context
def export(ctx: click.Context, model_dir: Path, out_dir: Path, profile: str | None, task: str, fp16: bool,
           bf16: bool, no_verify: bool, triton_repo: Path | None, overwrite: bool, quiet: bool, **options) -> None:
    """Export a HF model directory to ONNX (and TensorRT) with a parity certificate and latency report."""
    from hypermerge.errors import ConfigError
    from hypermerge.export import export_model
    from hypermerge.export.profiles import load_profile, profile_record
    from hypermerge.serve.triton import write_triton_repo

    if fp16 and bf16:
        raise ConfigError("--fp16 and --bf16 exclude each other", hint="pick one")
    # only what was typed overrides the profile; click's defaults are the profile defaults
    given = {key: options[name] for name, key in _PROFILE_OPTIONS.items()
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if fp16 or bf16:
        given["precision"] = "fp16" if fp16 else "bf16"
    if no_verify:
        given["verify"] = False
    resolved = load_profile(profile, given)  # every problem of the profile, before anything is loaded
    result = export_model(model_dir, out_dir, task, **resolved.export_options(), overwrite=overwrite,
                          progress=not quiet, profile=profile_record(profile, resolved))
    click.echo(f"exported {result.task} to {result.out} in {result.seconds:.1f} s: {', '.join(result.files)}")
    click.echo(result.report.markdown())
    if triton_repo is not None:
        _echo_triton(write_triton_repo(result.out, triton_repo, overwrite=overwrite))


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path),
              help="Adapter checkpoint directory (hypermerge or PEFT) made for the export's base model.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against the folded PyTorch model.")
@click.option("--trt", is_flag=True, help="Refit the export's TensorRT engine (built with REFIT) instead of dropping it.")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The base model directory [default: the one recorded at export].")
@click.option("--provider", default="auto", show_default=True,
              help="onnxruntime provider for the parity check: auto (TensorRT EP > CUDA EP > CPU), cpu, cuda, tensorrt.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads for the parity check.")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Parity: absolute tolerance, times max(1, the output's largest |value|).")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Parity: relative tolerance.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@quiet_option
@click.option("--allow-other-base", is_flag=True,
              help="Patch even if the export's weights differ from the adapter's record of its base (recorded).")
def patch(export_dir: Path, adapter_dir: Path, out_dir: Path, no_verify: bool, trt: bool, source: Path | None,
          provider: str, threads: int | None, atol: float, rtol: float, overwrite: bool, quiet: bool,
          allow_other_base: bool) -> None:
    """Fold an adapter into an exported model: same graph, new initializers, no re-export."""
    from hypermerge.export.parity import Tolerance
    from hypermerge.patch import patch_export

    result = patch_export(export_dir, adapter_dir, out_dir, verify=not no_verify, trt=trt, source=source,
                          overwrite=overwrite, tolerance=Tolerance(atol, rtol), provider=provider, threads=threads,
                          progress=not quiet, allow_other_base=allow_other_base)
    click.echo(f"patched {result.folded} tensors ({result.method}, {result.adapter_format} adapter) into "
               f"{result.out}: {result.initializers} initializers rewritten, graph unchanged, in {result.seconds:.1f} s")
    click.echo(f"base checked {result.base_check}")
    if result.unchanged:
        click.echo(f"{len(result.unchanged)} targeted tensors were left unchanged by the fold")
    if result.parity is not None:
        click.echo(f"parity vs the folded PyTorch model: passed (max abs err {result.parity['max_abs_err']:.3g}, "
                   f"max rel err {result.parity['max_rel_err']:.3g})")
    else:
        click.echo("parity not checked (--no-verify): run hypermerge verify on the output")
    if result.tensorrt is not None:
        refit = result.tensorrt["refit"]
        click.echo(f"TensorRT engine refitted: {refit['refitted']} weights in {refit['seconds']:.1f} s")
    for name in result.dropped:
        click.echo(f"not carried over: {name} (it holds the base's weights; "
                   + ("pass --trt to refit it)" if name == "model.engine" else "re-quantize the patched model)"))


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The HF model directory to compare with [default: the one recorded at export].")
@_latency_options
@quiet_option
def verify(export_dir: Path, source: Path | None, batch: int | None, seq: int | None, threads: int | None,
           iters: int, provider: str, atol: float, rtol: float, quiet: bool) -> None:
    """Re-run parity and latency on an exported directory and rewrite its report."""
    from hypermerge.export import verify_export
    from hypermerge.export.parity import Tolerance

    report = verify_export(export_dir, source=source, provider=provider, batch=batch, seq=seq, threads=threads,
                           iters=iters, tolerance=Tolerance(atol, rtol), progress=not quiet)
    click.echo(f"verified {export_dir}: parity passed; report.json and report.md rewritten")
    click.echo(report.markdown())


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server beyond this machine).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: any free port, printed).")
@click.option("--provider", default="auto", show_default=True,
              help="onnxruntime provider: auto (TensorRT EP > CUDA EP > CPU), cpu, cuda, tensorrt.")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="Most texts per model run; concurrent encoder requests are merged up to this (1: no batching). "
                   "Generation: most sequences generating at once (the others queue).")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True,
              help="How long a batch may wait for more requests, from its oldest request's arrival.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (uvicorn's), each with its own copy of the model.")
@click.option("--threads", type=int, default=None,
              help="onnxruntime threads per worker [default: the cores divided among the workers].")
@click.option("--max-inputs", type=int, default=256, show_default=True, help="Most texts or prompts per request.")
@click.option("--name", default=None, help="Model name reported to clients [default: the directory's name].")
@click.option("--graceful-timeout", type=float, default=30.0, show_default=True,
              help="Seconds SIGTERM waits for in-flight requests.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="An adapter requests may choose with \"adapter\": NAME (repeatable; exports made with "
                   "--adapter-inputs only). Each is loaded and checked at start-up.")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (repeatable; any of them is accepted). Also "
                   "HYPERMERGE_API_KEY (comma-separated) and --api-key-file, which keep keys out of `ps`.")
@click.option("--api-key-file", "api_key_files", multiple=True, type=click.Path(path_type=Path),
              help="A file of API keys, one per line, '#' comments (repeatable; e.g. a mounted secret).")
@click.option("--open-metrics", is_flag=True,
              help="Serve /metrics without a key even when keys are set (a scraper on a private network).")
@click.option("--max-queue", type=int, default=None,
              help="Most requests waiting for the model (per worker); more get 429 with Retry-After "
                   "[default: 8 x --max-batch].")
@click.option("--request-timeout", type=float, default=None,
              help="Seconds a request may wait for the model before it is answered 503 [default: no limit].")
@click.option("--model-file", default="model.onnx", show_default=True,
              help="The model to serve: model.onnx, or model.int8.onnx / model.int4.onnx / model.fp16.onnx where "
                   "the export kept one.")
@click.option("--quiet", "-q", is_flag=True, help="No access log (warnings and errors only).")
def serve(export_dir: Path, host: str, port: int, provider: str, max_batch: int, max_wait_ms: float, workers: int,
          threads: int | None, max_inputs: int, name: str | None, graceful_timeout: float, adapters: tuple[str, ...],
          api_keys: tuple[str, ...], api_key_files: tuple[Path, ...], open_metrics: bool, max_queue: int | None,
          request_timeout: float | None, model_file: str, quiet: bool) -> None:
    """Serve an exported directory over HTTP: /v1/embeddings, /v1/classify or /v1/completions (by task),
    /health, /metrics."""
    from hypermerge.errors import BackendUnavailableError, ConfigError

    named: dict[str, str] = {}
    for spec in adapters:
        adapter_name, sep, directory = spec.partition("=")
        if not sep or not adapter_name or not directory:
            raise ConfigError(f"--adapter takes NAME=DIR (got {spec!r})", hint="e.g. --adapter legal=adapters/legal")
        if adapter_name in named:
            raise ConfigError(f"--adapter {adapter_name} is given twice")
        named[adapter_name] = directory

    try:
        from hypermerge.serve.app import ServeSettings
        from hypermerge.serve.auth import API_KEY_ENV, collect_api_keys
        from hypermerge.serve.server import serve as run_server
    except ImportError as exc:
        raise BackendUnavailableError(f"serving needs fastapi, uvicorn and prometheus-client ({exc})",
                                      hint="pip install 'hypermerge[serve]'") from None
    keys = collect_api_keys(api_keys, os.environ.get(API_KEY_ENV), api_key_files)
    settings = ServeSettings(host=host, port=port, provider=provider, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             workers=workers, threads=threads, max_inputs=max_inputs, name=name,
                             graceful_timeout=graceful_timeout, quiet=quiet, adapters=named, api_keys=keys,
                             open_metrics=open_metrics, max_queue=max_queue, request_timeout=request_timeout,
                             model_file=model_file)
    run_server(export_dir, settings, announce=lambda line: click.echo(line),
               warn=lambda line: click.echo(line, err=True))
    click.echo("server stopped")


def _echo_triton(result) -> None:
    how = "model files hard-linked" if result.linked else "model files copied"
    click.echo(f"wrote Triton model {result.model_dir.name} to {result.repo} ({how}): {', '.join(result.files)}")


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("repo_dir", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Model name in the repository [default: the export directory's name].")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="Triton max_batch_size (0: no batching).")
@click.option("--max-queue-delay-us", type=int, default=2000, show_default=True,
              help="Dynamic batcher's wait for more requests.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="instance_group kind.")
@click.option("--model-file", default="model.onnx", show_default=True,
              help="model.onnx, or model.int8.onnx where the export kept one.")
@click.option("--overwrite", is_flag=True, help="Replace the model if the repository has it.")
def triton(export_dir: Path, repo_dir: Path, name: str | None, max_batch: int, max_queue_delay_us: int,
           instances: int, kind: str, model_file: str, overwrite: bool) -> None:
    """Write a Triton Inference Server model repository (onnxruntime backend) for an exported directory."""
    from hypermerge.serve.triton import write_triton_repo

    _echo_triton(write_triton_repo(export_dir, repo_dir, name=name, max_batch=max_batch,
                                   max_queue_delay_us=max_queue_delay_us, instances=instances, kind=kind,
                                   model_file=model_file, overwrite=overwrite))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: the recipe's output_dir, else runs/<recipe name>].")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (overrides the recipe).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the run directory.")
@click.option("--overwrite", is_flag=True, help="Remove a previous run in the run directory and start over.")
@quiet_option
def train(recipe: Path, output_dir: Path | None, max_steps: int | None, overrides: tuple[str, ...], resume: bool,
          overwrite: bool, quiet: bool) -> None:
    """Train an adapter (or a full fine-tune) from a recipe YAML; see train/ for recipes.

    For DDP, launch with torchrun or accelerate launch: torchrun --nproc_per_node 2 -m hypermerge train RECIPE
    """
    from hypermerge.training import train as run_training

    result = run_training(recipe, output_dir=output_dir, max_steps=max_steps, overrides=overrides, resume=resume,
                          overwrite=overwrite, quiet=quiet)
    if not result.metrics:  # not the first DDP process: it writes nothing
        return
    metrics = result.metrics
    scores = f"eval loss {metrics['eval_loss']:.4f}" if metrics.get("eval_loss") is not None else "no eval set"
    if metrics.get("eval_accuracy") is not None:
        scores += f", eval accuracy {metrics['eval_accuracy']:.4f}"
    click.echo(f"trained {metrics['method']} for {metrics['steps']} steps ({scores}); run in {result.output_dir}")
    if result.adapter_dir is not None:
        click.echo(f"  adapter  {result.adapter_dir}  (hypermerge fold --adapter {result.adapter_dir} --out DIR)")
    if result.model_dir is not None:
        click.echo(f"  model    {result.model_dir}")
    click.echo(f"  metrics  {result.metrics_path}")
    for plot in result.plots:
        click.echo(f"  plot     {plot}")
    click.echo(f"  recipe   {result.recipe_path}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="hypermerge")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
