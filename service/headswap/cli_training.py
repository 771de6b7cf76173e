"""`headswap finetune`, `headswap jobs`, `headswap cancel`: fine-tune jobs from the command line.

Standalone click commands; `headswap.cli` registers them into the main group. They only talk
gRPC (no TensorFlow here): the images stream to the server, which trains in the background.

"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import grpc

from headswap.client import call as _call
from headswap.client import channel as _channel
from headswap.client import Connection, target_option

# keras.utils.image_dataset_from_directory's extensions, plus WebP (the server decodes it).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
BATCH_IMAGES = 64
BATCH_BYTES = 8 * 1024 * 1024
STATE_NAMES = {0: "UNSPECIFIED", 1: "QUEUED", 2: "RUNNING", 3: "SUCCEEDED", 4: "FAILED", 5: "CANCELLED"}
SUCCEEDED = 3
TERMINAL = (3, 4, 5)


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    label: str
    validation: bool


def scan(data_dir: Path, validation: bool = False) -> list[LabelledFile]:
    """DATA_DIR/<class>/<image files>, as keras' image_dataset_from_directory reads it."""
    classes = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise click.UsageError(f"{data_dir} has no class folders: expected {data_dir}/<class name>/<image files>")
    files = []
    for folder in classes:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(LabelledFile(path, folder.name, validation))
    if not files:
        raise click.UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {data_dir}")
    return files


def requests(config, files: list[LabelledFile], progress) -> Iterator:
    """The FineTune stream: the config, then batches of at most BATCH_IMAGES / BATCH_BYTES."""
    from headswap.protocol import headswap_v1_pb2 as pb

    yield pb.FineTuneRequest(config=config)
    batch: list = []
    size = 0
    for item in files:
        data = item.path.read_bytes()
        if batch and (len(batch) >= BATCH_IMAGES or size + len(data) > BATCH_BYTES):
            yield pb.FineTuneRequest(batch=pb.ExampleBatch(examples=batch))
            batch, size = [], 0
        batch.append(pb.Example(image=data, label=item.label, validation=item.validation))
        size += len(data)
        progress.update(1)
    if batch:
        yield pb.FineTuneRequest(batch=pb.ExampleBatch(examples=batch))


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

    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

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
    config = pb.FineTuneConfig(
        base_model=base_model, name=name, epochs=epochs, learning_rate=learning_rate or 0.0,
        batch_size=batch_size or 0, dropout=dropout, validation_split=validation_split or 0.0,
        balance_classes=balance_classes, class_weights=weights, early_stopping_patience=early_stopping_patience,
        seed=seed, unfreeze_top_layers=unfreeze_top_layers, finetune_epochs=finetune_epochs or 0,
        finetune_learning_rate=finetune_learning_rate or 0.0, activate=not no_activate,
        min_val_accuracy=min_val_accuracy, skip_invalid_images=skip_invalid_images, label_smoothing=label_smoothing,
        hidden_units=hidden_units, precision=precision)
    classes = len({f.label for f in files})
    with _channel(target) as channel:
        stub = pb_grpc.TrainingStub(channel)
        with tqdm(total=len(files), desc=f"uploading {classes} classes", unit="img", file=sys.stderr) as bar:
            response = _call(stub.FineTune, requests(config, files, bar))
        click.echo(f"job {response.job_id}: {response.num_images} images, {response.num_classes} classes accepted")
        if response.skipped_indices:
            skipped = [str(files[i].path) for i in response.skipped_indices if i < len(files)]
            click.echo(f"skipped {len(skipped)} undecodable images: {', '.join(skipped[:10])}"
                       f"{' ...' if len(skipped) > 10 else ''}")
        if detach:
            return
        final = watch(stub, response.job_id)
    if final.state != SUCCEEDED:
        raise click.ClickException(f"job {response.job_id} {STATE_NAMES.get(final.state, '?').lower()}: "
                                   f"{final.message}")
    click.echo(final.message)
    if final.model:
        click.echo(f"classify with: headswap classify --model {final.model}:{final.version} IMAGE")


def watch(stub, job_id: str):
    """Follow WatchJob with a progress bar per phase; returns the last event."""
    from tqdm import tqdm

    from headswap.protocol import headswap_v1_pb2 as pb

    bar = None
    phase = ""
    last = None
    try:
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            last = event
            total = event.total_epochs or _images_total(event.message)
            if event.phase != phase or (bar is not None and total and bar.total != total):
                if bar is not None:
                    bar.close()
                phase = event.phase
                bar = tqdm(total=total or None, desc=phase.replace("_", " "), file=sys.stderr,
                           unit="epoch" if event.total_epochs else "img", leave=True,
                           bar_format=None if total else "{desc}: {elapsed} {postfix}")
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
    except grpc.RpcError as err:
        raise click.ClickException(f"{err.code().name}: {err.details()}") from None
    except KeyboardInterrupt:
        raise click.ClickException(f"stopped watching; job {job_id} goes on on the server "
                                   f"(`headswap cancel {job_id}` stops it)") from None
    finally:
        if bar is not None:
            bar.close()
    if last is None or last.state not in TERMINAL:
        raise click.ClickException(f"the server stopped sending progress of job {job_id}; "
                                   f"`headswap jobs {job_id}` shows where it is")
    return last


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
    from google.protobuf import json_format

    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    with _channel(target) as channel:
        stub = pb_grpc.TrainingStub(channel)
        if job_id:
            job = _call(stub.GetJob, pb.GetJobRequest(job_id=job_id))
            if as_json:
                click.echo(json_format.MessageToJson(job, preserving_proto_field_name=True))
                return
            _describe(job)
            return
        listing = _call(stub.ListJobs, pb.ListJobsRequest())
    if as_json:
        click.echo(json_format.MessageToJson(listing, preserving_proto_field_name=True))
        return
    if not listing.jobs:
        click.echo("no jobs")
        return
    click.echo(f"{'JOB':<13} {'STATE':<10} {'NAME':<20} {'BASE':<20} {'PHASE':<20} {'VAL ACC':>7} "
               f"{'VERSION':>7}  CREATED")
    for job in listing.jobs:
        metrics = json.loads(job.metrics_json or "{}")
        accuracy = f"{metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else "-"
        click.echo(f"{job.job_id:<13} {STATE_NAMES.get(job.state, '?'):<10} {job.name[:20]:<20} "
                   f"{job.base_model[:20]:<20} {job.phase:<20} {accuracy:>7} {job.version or '-':>7}  "
                   f"{_when(job.created)}")


def _describe(job) -> None:
    metrics = json.loads(job.metrics_json or "{}")
    click.echo(f"job       {job.job_id}")
    click.echo(f"state     {STATE_NAMES.get(job.state, '?')} ({job.phase})")
    click.echo(f"model     {job.name} from {job.base_model}")
    if job.version:
        click.echo(f"version   {job.model} v{job.version}{'  (activated)' if job.activated else ''}")
    click.echo(f"created   {_when(job.created)}   finished {_when(job.finished)}")
    if job.error:
        click.echo(f"error     {job.error}")
    event = job.last_event
    if event.phase:
        detail = f"epoch {event.epoch}/{event.total_epochs} " if event.total_epochs else ""
        click.echo(f"last      {event.phase} {detail}{event.message}")
    if metrics:
        click.echo(f"val acc   {metrics.get('val_accuracy', 0):.4f}  (train {metrics.get('num_train', 0)}, "
                   f"validation {metrics.get('num_val', 0)} images)")
        for label, figures in list(metrics.get("per_class", {}).items())[:50]:
            click.echo(f"  {label[:30]:<30} precision {figures['precision']:.3f}  recall {figures['recall']:.3f}  "
                       f"n={figures['support']}")
    click.echo(f"config    {job.config_json}")


@click.command()
@target_option
@click.argument("job_id")
def cancel(target: Connection, job_id: str) -> None:
    """Cancel a queued or running fine-tune job."""
    from headswap.protocol import headswap_v1_pb2 as pb
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

    with _channel(target) as channel:
        job = _call(pb_grpc.TrainingStub(channel).CancelJob, pb.CancelJobRequest(job_id=job_id))
    click.echo(f"job {job.job_id}: {STATE_NAMES.get(job.state, '?')}")
