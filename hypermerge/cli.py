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

from hypermerge._version import __version__
from hypermerge.errors import HypermergeError


class _UserError(click.ClickException):
    def __init__(self, error: HypermergeError):
        super().__init__(error.one_line())
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"hypermerge: error: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
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
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@quiet_option
def fold(adapter_dir: Path, base_dir: Path | None, out_dir: Path, dtype: str, overwrite: bool, quiet: bool) -> None:
    """Fold an adapter into its base model: a dense HF model directory with no adapter overhead."""
    from hypermerge.fold import fold_checkpoint

    result = fold_checkpoint(adapter_dir, out_dir, base=base_dir, dtype=dtype, overwrite=overwrite,
                             progress=not quiet)
    click.echo(f"folded {result.folded} weights ({result.method}) into {result.out} "
               f"in {result.seconds:.1f} s")


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
