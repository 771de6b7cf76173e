"""`headswap finetune`, `headswap jobs`, `headswap cancel`: fine-tune jobs from the command line.

Standalone click commands; `headswap.cli.main` registers them into the main group. They are built
on `headswap.client.Client` (no TensorFlow here): the images stream to the server, which trains in
the background, and the commands show its progress.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path

import click

from headswap.cli.evaluation_tables import evaluation_lines

from headswap.cli.options import connect, target_option
from headswap.client import Connection, Job, JobEvent, JobState
from headswap.client.images import Example, scan_folder


def scan(data_dir: Path, validation: bool = False) -> list[Example]:
    """The client's folder scan, with its refusal as a usage error."""
    try:
        return scan_folder(data_dir, validation)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


@click.command()
@target_option
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Registry name of the new model.")
@click.option("--base", "base_model", default="", help="Base model: a registry name or an exported source "
              "(builtin:/keras:/hub:) [default: the built-in model].")
@click.option("--epochs", type=int, default=10, show_default=True, help="Head training epochs.")
@click.option("--learning-rate", type=float, default=None, help="Head learning rate [server default 5e-3].")
@click.option("--batch-size", type=int, default=None, help="Training batch size [server default 32].")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout before the new head.")
@click.option("--validation-split", type=float, default=None,
              help="Fraction held out for validation, stratified [server default 0.2].")
@click.option("--validation-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An explicit validation set in the same layout (replaces the split).")
@click.option("--balance-classes", is_flag=True, help="Weight classes inversely to their frequency.")
@click.option("--class-weight", "class_weights", multiple=True, metavar="LABEL=WEIGHT",
              help="Explicit class weight (repeatable); overrides --balance-classes.")
@click.option("--early-stopping-patience", type=int, default=0, show_default=True,
              help="Stop after this many epochs without validation improvement (0 = off).")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--unfreeze-top-layers", type=int, default=0, show_default=True,
              help="Phase 2: unfreeze the backbone's top N layers (0 = head only).")
@click.option("--finetune-epochs", type=int, default=None, help="Phase 2 epochs [server default 2].")
@click.option("--finetune-learning-rate", type=float, default=None, help="Phase 2 learning rate [server default 1e-4].")
@click.option("--no-activate", is_flag=True, help="Store the new version without making it the active one.")
@click.option("--min-val-accuracy", type=float, default=0.0, show_default=True,
              help="Activate only at this validation accuracy or better.")
@click.option("--skip-invalid-images", is_flag=True, help="Train without undecodable images instead of failing.")
@click.option("--hidden-units", type=click.IntRange(0, 4096), default=0, show_default=True,
              help="A hidden Dense(N, relu) layer before the output (the seeds' recipe uses 256; 0 = none).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="Store a fast tier (OpenVINO) instead of fp32, if it loses at most 0.5 points of validation "
                   "accuracy.")
@click.option("--detach", is_flag=True, help="Print the job id once the data is accepted, do not watch.")
def finetune(target: Connection, data_dir: Path, name: str, base_model: str, epochs: int, learning_rate: float | None,
             batch_size: int | None, dropout: float, validation_split: float | None, validation_dir: Path | None,
             balance_classes: bool, class_weights: tuple[str, ...], early_stopping_patience: int,
             label_smoothing: float, seed: int, unfreeze_top_layers: int, finetune_epochs: int | None,
             finetune_learning_rate: float | None, no_activate: bool, min_val_accuracy: float,
             skip_invalid_images: bool, hidden_units: int, precision: str, detach: bool) -> None:
    """Fine-tune a new model on DATA_DIR/<class>/<images> and watch it train.

    Exits 0 only when the new version was stored; by default it then answers under NAME.
    """
    from tqdm import tqdm

    weights = {}
    for item in class_weights:
        label, sep, value = item.rpartition("=")
        try:
            weights[label] = float(value)
        except ValueError:
            sep = ""
        if not sep or not label:
            raise click.BadParameter(f"expected LABEL=WEIGHT, got {item!r}", param_hint="--class-weight")
    files = scan(data_dir) + (scan(validation_dir, validation=True) if validation_dir else [])
    config = dict(
        base_model=base_model, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, dropout=dropout,
        validation_split=validation_split, balance_classes=balance_classes, class_weights=weights,
        early_stopping_patience=early_stopping_patience, seed=seed, unfreeze_top_layers=unfreeze_top_layers,
        finetune_epochs=finetune_epochs, finetune_learning_rate=finetune_learning_rate, activate=not no_activate,
        min_val_accuracy=min_val_accuracy, skip_invalid_images=skip_invalid_images, label_smoothing=label_smoothing,
        hidden_units=hidden_units, precision=precision)
    classes = len({f.label for f in files})
    with connect(target) as client:
        with tqdm(total=len(files), desc=f"uploading {classes} classes", unit="img", file=sys.stderr) as bar:
            def uploaded(sent: int) -> None:
                bar.n = sent
                bar.refresh()

            # The files as scanned above, in the same order: skipped indices name them.
            pairs = [(f.image, f.label) for f in files if not f.validation]
            checks = [(f.image, f.label) for f in files if f.validation] or None
            submission = client.submit(pairs, name=name, validation_data=checks, on_upload=uploaded,
                                       **config)  # type: ignore[arg-type]
        click.echo(f"job {submission.job_id}: {submission.num_images} images, {submission.num_classes} "
                   f"classes accepted")
        if submission.skipped:
            skipped = [str(files[i].image) for i in submission.skipped if i < len(files)]
            click.echo(f"skipped {len(skipped)} undecodable images: {', '.join(skipped[:10])}"
                       f"{' ...' if len(skipped) > 10 else ''}")
        if detach:
            return
        job = watch(client, submission.job_id)
    message = job.last_event.message if job.last_event is not None else ""
    if not job.succeeded:
        raise click.ClickException(f"job {job.job_id} {job.state.name.lower()}: {job.error or message}")
    click.echo(message)
    if job.model:
        click.echo(f"classify with: headswap classify --model {job.model}:{job.version} IMAGE")


class _ProgressBars:
    """One tqdm bar per job phase: epochs with loss and accuracy, or images with images/s and ETA."""

    def __init__(self) -> None:
        self.bar = None
        self.phase = ""

    def __call__(self, event: JobEvent) -> None:
        from tqdm import tqdm

        total = event.total_epochs or _images_total(event.message)
        if event.phase != self.phase or (self.bar is not None and total and self.bar.total != total):
            self.close()
            self.phase = event.phase
            self.bar = tqdm(total=total or None, desc=event.phase.replace("_", " "), file=sys.stderr,
                            unit="epoch" if event.total_epochs else "img", leave=True,
                            bar_format=None if total else "{desc}: {elapsed} {postfix}")
        bar = self.bar
        if event.total_epochs:
            bar.n = event.epoch
            if event.epoch:
                bar.set_postfix(loss=f"{event.loss:.4f}", acc=f"{event.accuracy:.4f}",
                                val_acc=f"{event.val_accuracy:.4f}", refresh=False)
        else:
            done = _images_done(event.message)
            if done is not None:
                bar.n = done
                bar.set_postfix(img_s=f"{event.images_per_second:.1f}", eta=f"{event.eta_seconds:.0f}s",
                                refresh=False)
            elif event.message:
                bar.set_postfix_str(event.message[:80], refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def watch(client, job_id: str) -> Job:
    """Follow the job with a progress bar per phase; returns the finished job."""
    bars = _ProgressBars()
    try:
        return client.watch(job_id, on_progress=bars)
    except KeyboardInterrupt:
        raise click.ClickException(f"stopped watching; job {job_id} goes on on the server "
                                   f"(`headswap cancel {job_id}` stops it)") from None
    finally:
        bars.close()


def _images_done(message: str) -> int | None:
    head = message.split(" ", 1)[0]
    done, sep, _ = head.partition("/")
    return int(done) if sep and done.isdigit() else None


def _images_total(message: str) -> int:
    head = message.split(" ", 1)[0]
    _, sep, total = head.partition("/")
    return int(total) if sep and total.isdigit() else 0


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


@click.command()
@target_option
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(target: Connection, job_id: str | None, as_json: bool) -> None:
    """List fine-tune jobs, or show JOB_ID in detail."""
    with connect(target) as client:
        if job_id:
            job = client.job(job_id)
            if as_json:
                click.echo(json.dumps(_plain(job), indent=2))
                return
            _describe(job)
            return
        listing = client.jobs()
    if as_json:
        click.echo(json.dumps({"jobs": [_plain(job) for job in listing]}, indent=2))
        return
    if not listing:
        click.echo("no jobs")
        return
    click.echo(f"{'JOB':<13} {'STATE':<10} {'NAME':<20} {'BASE':<20} {'PHASE':<20} {'VAL ACC':>7} "
               f"{'VERSION':>7}  CREATED")
    for job in listing:
        accuracy = f"{job.metrics['val_accuracy']:.4f}" if "val_accuracy" in job.metrics else "-"
        click.echo(f"{job.job_id:<13} {job.state.name:<10} {job.name[:20]:<20} "
                   f"{job.base_model[:20]:<20} {job.phase:<20} {accuracy:>7} {job.version or '-':>7}  "
                   f"{_when(job.created)}")


def _plain(job: Job) -> dict:
    """A job as JSON-ready values: states by name, metrics and configuration as objects."""
    return dataclasses.asdict(job, dict_factory=lambda items: {
        key: value.name if isinstance(value, JobState) else value for key, value in items})


def _describe(job: Job) -> None:
    metrics = job.metrics
    click.echo(f"job       {job.job_id}")
    click.echo(f"state     {job.state.name} ({job.phase})")
    click.echo(f"model     {job.name} from {job.base_model}")
    if job.version:
        click.echo(f"version   {job.model} v{job.version}{'  (activated)' if job.activated else ''}")
    click.echo(f"created   {_when(job.created)}   finished {_when(job.finished)}")
    if job.error:
        click.echo(f"error     {job.error}")
    event = job.last_event
    if event is not None and event.phase:
        detail = f"epoch {event.epoch}/{event.total_epochs} " if event.total_epochs else ""
        click.echo(f"last      {event.phase} {detail}{event.message}")
    click.echo(f"config    {json.dumps(job.config)}")
    lines = evaluation_lines(metrics, job.version)
    if lines:
        click.echo("")
        click.echo("\n".join(lines))


@click.command()
@target_option
@click.argument("job_id")
def cancel(target: Connection, job_id: str) -> None:
    """Cancel a queued or running fine-tune job."""
    with connect(target) as client:
        job = client.cancel(job_id)
    click.echo(f"job {job.job_id}: {job.state.name}")
