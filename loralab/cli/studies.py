"""`loralab studies` (list, show, copy the bundled study files) and `loralab compare --dry-run`.

Like `tune ls` / `tune cat` / `tune cp`: the bundled studies are starting points, so the
command lists them with one line each, prints one, or copies one to a file the user edits.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import cast

import yaml

from loralab import study
from loralab.errors import UserError
from loralab.results.database import DB_NAME, ResultsDB


def description(path: Path, limit: int = 100) -> str:
    """One line about a study file: its `description:` key, else the first sentence of its
    leading comment block, cut to `limit` characters."""
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    desc = str(raw.get("description") or "") if isinstance(raw, dict) else ""
    if not desc.strip():
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        desc = " ".join(comment)
    desc = " ".join(desc.split())
    first = re.split(r"(?<=[.?!])\s+(?=[A-Z])", desc, maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit - 3].rstrip() + "..."


def _renamed_copy(text: str, name: str) -> tuple[str, bool]:
    """The study text with its top-level `name:` set to `name` (the copy's file stem), and
    whether it changed. Why: a copy that kept the bundled name would write into the bundled
    study's output folder (OUT/<name>) and, once edited, set the bundled study's runs aside."""
    lines = text.splitlines(keepends=True)
    for k, line in enumerate(lines):
        if re.match(r"name\s*:", line):
            new = f"name: {name}\n"
            if line.strip() == new.strip():
                return text, False
            lines[k] = new
            return "".join(lines), True
    return text, False


def _bundled(name: str) -> Path:
    studies = study.bundled_studies()
    stem = name.removesuffix(".yaml")
    if stem not in studies:
        raise UserError(f"no bundled study named {name!r}; bundled studies: "
                        f"{', '.join(sorted(studies))} (see `loralab studies`)")
    return studies[stem]


def run_studies(args: argparse.Namespace) -> int:
    """List, show or copy the bundled studies."""
    if args.action in (None, "list", "ls"):
        studies = study.bundled_studies()
        width = max(len(n) for n in studies)
        for name in sorted(studies):
            print(f"{name:<{width}}  {description(studies[name])}")
        return 0
    if not args.name:
        raise UserError(f"`loralab studies {args.action}` needs a study name; see "
                        "`loralab studies`")
    path = _bundled(args.name)
    if args.action in ("show", "cat"):
        print(path.read_text(encoding="utf-8"), end="")
        return 0
    if args.action in ("copy", "cp"):
        if not args.dest:
            raise UserError("`loralab studies copy NAME DEST` needs a destination file or "
                            "directory")
        dest = Path(args.dest)
        if dest.is_dir():
            dest = dest / path.name
        if dest.exists() and not args.force:
            raise UserError(f"{dest} exists; pass another DEST or --force to overwrite it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        text, renamed = _renamed_copy(path.read_text(encoding="utf-8"), dest.stem)
        dest.write_text(text, encoding="utf-8")
        said = f" (study renamed to {dest.stem!r}, so its results go to their own folder)" \
            if renamed else ""
        print(f"copied {path.name} to {dest}{said}; run it with `loralab compare {dest}`")
        return 0
    raise UserError(f"unknown action {args.action!r}; use list, show NAME or copy NAME DEST")


class _NoDB:
    """Stands in for a results database that does not exist yet: no run is recorded."""

    def get(self, run_id: str) -> None:
        return None


def dry_run(spec: study.Study, out_dir: Path) -> int:
    """Print the resolved study (after overrides) as YAML and its plan: each run, what would
    happen to it (train, resume, skip, ingest) and its settings. Trains and writes nothing."""
    study.check_configs(spec, out_dir)  # every run's settings are valid TrainConfig fields
    print(f"# study {spec.name} (from {spec.path}), resolved")
    print(yaml.safe_dump(study.study_summary(spec), sort_keys=False, width=100).rstrip())
    db_path = out_dir / DB_NAME
    db = ResultsDB(db_path) if db_path.is_file() else cast(ResultsDB, _NoDB())
    try:
        actions = list(study.plan(spec, out_dir, db))
    finally:
        if isinstance(db, ResultsDB):
            db.close()
    todo = sum(a != "skip" for _, a in actions)
    print(f"\n# plan: {len(actions)} runs ({len(spec.strategies)} strategies x "
          f"{len(spec.seeds)} seeds), {todo} to run, output {out_dir}")
    width = max(len(s.run_id) for s, _ in actions)
    for run, action in actions:
        print(f"{action:<6}  {run.run_id:<{width}}  {study.describe_run(run.config)}")
    return 0


RUN = {"studies": run_studies}
