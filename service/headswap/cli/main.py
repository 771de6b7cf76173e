"""The `headswap` click group: run the server, build models, and talk to a server.

Client commands are built on `headswap.client.Client`; they print the server's error message
and exit non-zero when a call fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from headswap.cli.options import connect, target_option
from headswap.cli.rollout import rollout
from headswap.cli.training import cancel, finetune, jobs
from headswap.client import Connection
from headswap.config import Settings, env_name, field_type, flag_name


def _settings_options(command: Callable) -> Callable:
    """One flag per Settings field; the environment fallback is applied by Settings.from_env."""
    for f in reversed(dataclasses.fields(Settings)):
        kind = field_type(f)
        choices = f.metadata.get("choices")
        if kind is bool:  # --reflection / --no-reflection
            name = flag_name(f.name)
            command = click.option(f"{name}/--no-{name[2:]}", f.name, default=None,
                                   help=f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]")(command)
            continue
        command = click.option(flag_name(f.name), f.name, default=None,
                               type=click.Choice(choices) if choices else kind,
                               help=f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]")(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """headswap: image classification over gRPC (zero-shot ImageNet, fine-tuned heads)."""


@main.command()
@_settings_options
def serve(**flags: Any) -> None:
    """Run the gRPC server (zero-shot on the built-in model unless told otherwise)."""
    from headswap import logs, server

    try:
        settings = Settings.from_env(**flags).validate()
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    logs.configure(settings.log_level, settings.log_format, settings.log_refusals_per_minute)
    server.run(settings)


@main.command()
@click.argument("source")
@click.option("--weights", default=None, help="Local weights file (keras: .weights.h5; builtin: .pth).")
@click.option("--name", default=None, help="Registry name (default: derived from SOURCE).")
@click.option("--model-dir", default=None, envvar="HEADSWAP_MODEL_DIR", help="Registry location [default: models].")
@click.option("--no-activate", is_flag=True, help="Store the version without making it active.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="fp32, or a fast tier served by OpenVINO (bf16; int8 calibrated on photos that ship with "
                   "scikit-image), published only if it passes the accuracy gate.")
@click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=0.99, show_default=True,
              help="Accuracy gate of a bf16/int8 tier: share of held-out photos answered with fp32's top-1.")
def export(source: str, weights: str | None, name: str | None, model_dir: str | None, no_activate: bool,
           precision: str, min_agreement: float) -> None:
    """Convert SOURCE (builtin:NAME, keras:APP, hub:HANDLE) to ONNX and store it in the registry."""
    from headswap import logs
    from headswap.errors import HeadswapError
    from headswap.export.onnx_export import export_source
    from headswap.export.precision import Gate
    from headswap.registry.registry import Registry

    logs.configure("INFO")
    registry = Registry(model_dir or Settings().model_dir)
    try:
        model, version = export_source(source, registry, name=name, weights=weights, activate=not no_activate,
                                       precision=precision, gate=Gate(min_agreement=min_agreement))
    except HeadswapError as err:
        raise click.ClickException(str(err)) from None
    manifest = registry.manifest(model, version)
    tier = ""
    if manifest.get("accuracy"):
        accuracy = manifest["accuracy"]
        recheck = manifest.get("recheck")
        rechecked = (f", {100 * recheck['heldout_share']:.1f}% of them re-checked in fp32 as near ties"
                     if recheck else "")
        tier = (f", {manifest['precision']} in {manifest['runtime']}: top-1 agreement with fp32 "
                f"{100 * accuracy['top1_agreement']:.1f}% on {accuracy['heldout_images']} held-out photos{rechecked}")
    click.echo(f"stored {model} version {version} in {registry.url} "
               f"(parity max abs diff {manifest['parity']['max_abs_diff']:.2e}{tier})")


@main.command()
@target_option
@click.option("--model", default="", help="NAME or NAME:VERSION (default: the server's default model).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def classify(target: Connection, model: str, top_k: int, as_json: bool, images: tuple[Path, ...]) -> None:
    """Classify IMAGE files."""
    name, version = _model_ref(model)
    with connect(target) as client:
        answer = client.classify(list(images), model=name, version=version, top_k=top_k)
    for path, predictions in zip(images, answer):
        ood_score = getattr(predictions, "ood_score", 0.0)
        in_distribution = getattr(predictions, "in_distribution", None)
        if as_json:
            click.echo(json.dumps({"image": str(path), "model": answer.model, "version": answer.version,
                                   "predictions": [{"label": p.label, "index": p.index, "score": round(p.score, 6)}
                                                   for p in predictions],
                                   "ood_score": round(ood_score, 6), "in_distribution": in_distribution}))
        else:
            verdict = {True: "in distribution", False: "OUT OF DISTRIBUTION: unlike the model's training images",
                       None: "no threshold for this model"}[in_distribution]
            click.echo(f"{path}  ({answer.model} v{answer.version})  ood score {ood_score:.4g}: {verdict}")
            for p in predictions:
                click.echo(f"  {p.score:7.4f}  {p.label}  [{p.index}]")


@main.command()
@target_option
@click.option("--model", required=True, help="NAME or NAME:VERSION of the model to rank for.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=1), help="How many images to recommend.")
@click.option("--uncertainty", type=click.Choice(["margin", "entropy"]), default="margin", show_default=True)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Images per call (more are ranked as a tournament, see Client.rank_for_labelling).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def rank(target: Connection, model: str, top: int, uncertainty: str, batch_size: int, as_json: bool,
         folder: Path) -> None:
    """Which images under FOLDER to label next: the model's most uncertain, never near-duplicates."""
    from headswap.client.images import IMAGE_EXTENSIONS

    name, version = _model_ref(model)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise click.ClickException(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    with connect(target) as client:
        ranking = client.rank_for_labelling(files, model=name, version=version, top=top, uncertainty=uncertainty,
                                            batch_size=batch_size)
    for image in [*ranking, *ranking.already_labelled]:
        if as_json:
            click.echo(json.dumps({"image": str(files[image.index]), "rank": image.rank,
                                   "uncertainty": round(image.uncertainty, 6), "predicted_label": image.label,
                                   "predicted_score": round(image.score, 6),
                                   "already_labelled": image.already_labelled}))
    if as_json:
        return
    click.echo(f"{ranking.model} v{ranking.version}: {len(ranking)} of {len(files)} images to label next "
               f"(uncertainty: {ranking.uncertainty})")
    click.echo(f"{'rank':>4}  {'uncertainty':>11}  {'predicted':<24} image")
    for image in ranking:
        predicted = f"{image.label[:16]} ({image.score:.2f})"
        click.echo(f"{image.rank:>4}  {image.uncertainty:>11.3f}  {predicted:<24} {files[image.index]}")
    if not ranking.training_set_known:
        click.echo(f"{ranking.model} v{ranking.version} records no training set (a zero-shot model, or a version "
                   "published before training sets were recorded): no image can be marked as already labelled")
    elif ranking.already_labelled:
        click.echo(f"already labelled (in the model's training set), not recommended: {len(ranking.already_labelled)}")
        for image in ranking.already_labelled:
            click.echo(f"         {files[image.index]}")
    if ranking.near_duplicates:
        click.echo(f"left out as near-duplicates of a recommended or labelled image: {ranking.near_duplicates}")


@main.command()
@target_option
@click.option("--service", default="", help="Service or model name to check ('' = the whole server).")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--local", is_flag=True,
              help="Check the server this container runs, from its HEADSWAP_* settings: the plaintext "
                   "--health-port when one is set, else --port (for a Dockerfile HEALTHCHECK).")
def health(target: Connection, service: str, timeout: float, local: bool) -> None:
    """Exit 0 when the server (or one model) reports SERVING: for container health checks."""
    if local:
        target = _local_health_target()
    with connect(target) as client:
        status = client.health(service, timeout=timeout)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


def _local_health_target() -> Connection:
    """Where this container's own server answers health in plaintext: its health-only port, or its
    gRPC port when that has no TLS. With TLS and no health port there is none: say which setting."""
    settings = Settings.from_env()
    if settings.health_port > 0:
        return Connection(f"127.0.0.1:{settings.health_port}")
    if settings.tls_cert_file:
        raise click.UsageError("the gRPC port serves TLS only; set HEADSWAP_HEALTH_PORT (a plaintext "
                               "health-only port) for local health checks")
    return Connection(f"127.0.0.1:{settings.port}")


@main.command()
@target_option
def models(target: Connection) -> None:
    """List the models in the server's registry."""
    with connect(target) as client:
        listing = client.models()
    for m in listing:
        click.echo(f"{m.name}  active v{m.active_version}  versions {list(m.versions)}  "
                   f"{m.num_labels} labels  {m.input_height}x{m.input_width}  {m.source}"
                   f"{'  ready' if m.ready else ''}")


@main.command()
@target_option
@click.argument("name")
@click.argument("version", type=int)
def activate(target: Connection, name: str, version: int) -> None:
    """Make VERSION of model NAME the one that answers."""
    with connect(target) as client:
        info = client.activate(name, version)
    click.echo(f"{info.name}: version {info.active_version} is active")


@main.command()
@target_option
@click.argument("name")
def rollback(target: Connection, name: str) -> None:
    """Re-activate the version of NAME that was active before the current one."""
    with connect(target) as client:
        info = client.rollback(name)
    click.echo(f"{info.name}: version {info.active_version} is active")


@main.command("new-token")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(("classify", "train", "admin")),
              help="What the token may do (repeatable).")
def new_token(name: str, scopes: tuple[str, ...]) -> None:
    """Make a random bearer token for NAME: the token for the caller, its entry for --auth-tokens-file.

    Only the entry (a sha256 of the token) goes into the server's credentials file.
    """
    import secrets

    from headswap.security.credentials import token_sha256

    token = secrets.token_urlsafe(32)
    click.echo(f"token (give it to {name}, keep it secret): {token}")
    click.echo("entry for the credentials file: " + json.dumps(
        {"name": name, "token_sha256": token_sha256(token), "scopes": sorted(set(scopes))}))


# --- helpers --------------------------------------------------------------------------------

def _model_ref(text: str) -> tuple[str, int]:
    name, _, version = text.partition(":")
    if version and not version.isdigit():
        raise click.BadParameter(f"version must be a number, got {version!r}", param_hint="--model")
    return name, int(version or 0)


for _command in (finetune, jobs, cancel, rollout):
    main.add_command(_command)
