"""`headswap rollout start|status|promote|abort`: safe rollouts of a new version (docs/rollouts.md)."""

from __future__ import annotations

import json

import click

from headswap.cli.options import connect, target_option
from headswap.client import Connection, RolloutStatus


@click.group()
def rollout() -> None:
    """Roll a new version out beside the active one: canary split or shadow comparison."""


@rollout.command()
@target_option
@click.argument("name")
@click.argument("version", type=int)
@click.option("--canary", type=click.IntRange(1, 99), help="Percentage of requests the candidate answers.")
@click.option("--shadow", type=click.IntRange(1, 99),
              help="Percentage of requests the candidate also runs on (answers discarded, compared).")
@click.option("--manual", is_flag=True, help="No automatic decision: end it with promote or abort.")
def start(target: Connection, name: str, version: int, canary: int | None, shadow: int | None, manual: bool) -> None:
    """Start rolling VERSION of model NAME out."""
    if (canary is None) == (shadow is None):
        raise click.UsageError("give exactly one of --canary PERCENT or --shadow PERCENT")
    with connect(target) as client:
        status = client.start_rollout(name, version, canary=canary or 0, shadow=shadow or 0, manual=manual)
    _show(status)


@rollout.command()
@target_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The whole status as one JSON object.")
def status(target: Connection, name: str, as_json: bool) -> None:
    """The running rollout of NAME with live per-version figures, else the last one that ended."""
    with connect(target) as client:
        answer = client.rollout(name)
    if as_json:
        click.echo(json.dumps(answer.__dict__, default=list))
    else:
        _show(answer)


@rollout.command()
@target_option
@click.argument("name")
def promote(target: Connection, name: str) -> None:
    """Make the candidate of NAME's rollout the active version now."""
    with connect(target) as client:
        _show(client.promote_rollout(name))


@rollout.command()
@target_option
@click.argument("name")
def abort(target: Connection, name: str) -> None:
    """End NAME's rollout; the stable version keeps answering."""
    with connect(target) as client:
        _show(client.abort_rollout(name))


def _show(status: RolloutStatus) -> None:
    if not status.mode:
        click.echo(f"{status.name}: no rollout has run")
        return
    state = "running" if status.running else status.outcome
    click.echo(f"{status.name}: rollout of version {status.candidate_version} beside version {status.stable_version}: "
               f"{status.mode} {status.percent}%{' manual' if status.manual else ''}, {state}")
    for figures in status.figures:
        line = (f"  v{figures['version']} {figures['role']:9}  {figures['requests']} requests  "
                f"{figures['errors']} errors ({100 * figures['error_rate']:.2f}%)  p50 {figures['p50_ms']:.1f} ms  "
                f"p99 {figures['p99_ms']:.1f} ms")
        if status.mode == "shadow" and figures["role"] == "candidate":
            line += (f"  agreement {100 * figures['agreement']:.1f}% ({figures['agreed']}/{figures['compared']})"
                     f"  dropped {figures['dropped']}")
        click.echo(line)
    for event in status.events:
        click.echo(f"  event: {event['what']}")
