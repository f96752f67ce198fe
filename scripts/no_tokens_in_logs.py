"""Fail when a log of a test run holds one of its tokens: tokens are compared, never logged.

    python scripts/no_tokens_in_logs.py TOKENS_FILE DIR [DIR ...]

The tokens are every caller's token and the feedback signing key in TOKENS_FILE and in any other
``tokens.json`` under the directories (tests make their own). The logs are the files under the
directories whose name ends in .log, .out, .txt or .jsonl, or that sit in a ``logs`` folder:
pytest's output, the Airflow components' and tasks' logs, the servers' logs. What was found is
named by file and caller, never printed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LOG_SUFFIXES = (".log", ".out", ".txt", ".jsonl")
MIN_SECRET = 16  # shorter values are not tokens of ours, and would match by chance


def secrets_in(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    found = {f"{path}:{name}": entry.get("token", "") for name, entry in (data.get("callers") or {}).items()
             if isinstance(entry, dict)}
    found[f"{path}:feedback_key"] = data.get("feedback_key") or ""
    return {where: value for where, value in found.items() if isinstance(value, str) and len(value) >= MIN_SECRET}


def logs_under(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and (path.suffix in LOG_SUFFIXES or "logs" in path.parts):
            yield path


def main(tokens_file: str, *folders: str) -> int:
    roots = [Path(f) for f in folders if Path(f).is_dir()]
    secrets = secrets_in(Path(tokens_file))
    for root in roots:
        for other in root.rglob("tokens.json"):
            secrets.update(secrets_in(other))
    if not secrets:
        print(f"no tokens to look for ({tokens_file} holds none)")
        return 0
    needles = {value.encode(): where for where, value in secrets.items()}
    leaks, scanned = [], 0
    for root in roots:
        for log in logs_under(root):
            try:
                text = log.read_bytes()
            except OSError:
                continue
            scanned += 1
            leaks += [f"{log}: the token of {where}" for needle, where in needles.items() if needle in text]
    for leak in leaks:
        print(f"TOKEN IN A LOG: {leak}", file=sys.stderr)
    print(f"searched {scanned} log files for {len(needles)} tokens: {len(leaks)} found")
    return 1 if leaks else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
