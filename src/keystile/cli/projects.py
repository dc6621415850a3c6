"""The ``projects`` and ``alerts rules`` commands: a project's name, and the alert rules of
a project or of one key (:mod:`keystile.manager_projects`)."""

from __future__ import annotations

import argparse
from typing import TextIO

from keystile.alerts import AlertRules
from keystile.audit import Actor
from keystile.cli.output import dump as _dump
from keystile.cli.output import table as _table
from keystile.cli.output import when as _when
from keystile.cli.parser import CommandLineError
from keystile.manager import KeyManager
from keystile.models import DEFAULT_PROJECT
from keystile.projects import KeyAlertRules, ProjectAlertRules, ProjectInfo, Rules

__all__ = ["project_rename", "project_show", "projects", "rules"]


async def projects(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    found = await manager.projects()
    if args.project is not None:
        found = [p for p in found if p.id == args.project]
    if args.json:
        _dump(out, {"projects": [p.model_dump(mode="json") for p in found]})
    elif found:
        _table(
            out,
            ("ID", "NAME", "KEYS", "CREATED"),
            [(p.id, p.name, str(p.keys or 0), _when(p.created_at)) for p in found],
        )
    else:
        out.write("no projects\n")
    return 0


def _project_details(out: TextIO, info: ProjectInfo) -> None:
    for label, value in (
        ("id", info.id),
        ("name", info.name + ("" if info.recorded else " (not renamed: its id)")),
        ("description", info.description or "-"),
        ("created", _when(info.created_at)),
        ("updated", _when(info.updated_at)),
    ):
        out.write(f"{label:<13}{value}\n")


async def project_show(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    info = await manager.project_info(args.project or DEFAULT_PROJECT)
    if args.json:
        _dump(out, {"project": info.model_dump(mode="json")})
    else:
        _project_details(out, info)
    return 0


async def project_rename(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    changes = {"name": args.name, "description": args.description}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise CommandLineError("nothing to change: give a NAME or --description")
    info = await manager.update_project(
        args.project or DEFAULT_PROJECT, changes, by=Actor.command_line()
    )
    if args.json:
        _dump(out, {"project": info.model_dump(mode="json")})
    else:
        _project_details(out, info)
    return 0


def _rule_lines(
    out: TextIO, title: str, effective: AlertRules, *levels: tuple[str, Rules]
) -> None:
    out.write(f"{title}\n")
    for name, value in effective.model_dump(mode="json").items():
        source = "default"
        for level, rules in levels:
            if name in rules:
                source = level
        shown = "off" if value is None else value
        if isinstance(shown, list):
            shown = ",".join(str(v) for v in shown) or "none"
        out.write(f"  {name:<22}{shown!s:<16}({source})\n")


async def rules(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    by = Actor.command_line()
    project = args.project if args.key or args.project else DEFAULT_PROJECT
    answer: ProjectAlertRules | KeyAlertRules
    if args.action == "set":
        changes = dict(args.rules)
        if args.key:
            answer = await manager.set_key_alert_rules(
                args.key, changes, project=project, replace=args.replace, by=by
            )
        else:
            answer = await manager.set_alert_rules(
                changes, project=project or DEFAULT_PROJECT, replace=args.replace, by=by
            )
    elif args.action == "clear":
        if args.key:
            answer = await manager.clear_key_alert_rules(args.key, project=project, by=by)
        else:
            answer = await manager.clear_alert_rules(project=project or DEFAULT_PROJECT, by=by)
    elif args.key:
        answer = await manager.key_alert_rules(args.key, project=project)
    else:
        answer = await manager.alert_rules(project or DEFAULT_PROJECT)
    if args.json:
        _dump(out, {"alert_rules": answer.model_dump(mode="json")})
    elif isinstance(answer, KeyAlertRules):
        _rule_lines(
            out,
            f"alert rules of {answer.key_id} (project {answer.project})",
            answer.effective,
            ("project", answer.project_rules),
            ("key", answer.overrides),
        )
    else:
        _rule_lines(
            out,
            f"alert rules of project {answer.project}",
            answer.effective,
            ("project", answer.rules),
        )
        if answer.overridden:
            out.write(f"keys with overrides: {', '.join(answer.overridden)}\n")
    return 0
