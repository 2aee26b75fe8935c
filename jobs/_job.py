"""What every ``jobs/<stage>.py`` entrypoint does: run one `tiger` command, with the run anywhere.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train_seq2seq.py --run s3://bucket/runs/beauty --preset paper --use-gpu

The flags are those of `tiger <command>`: the same parser, presets and config dataclasses, so there
is one configuration system. On top of them:

- ``--run`` (``--out`` for prepare) may be a URI that ``pyarrow.fs`` opens (``s3://``, ``gs://``,
  ``file://`` ...). The run is staged into a local working copy for the command and what the
  command changed is uploaded when it succeeds (``tiger_ray.storage``).
- ``--stage-dir DIR`` (default ``$TIGER_STAGE_DIR``) keeps that working copy between jobs; on a
  multi-node cluster it must be on a filesystem every node mounts (cluster.yaml sets it).
- ``-v`` / ``--verbose``: debug logging, as `tiger -v`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

JOBS_DIR = Path(__file__).resolve().parent
REPO = JOBS_DIR.parent
# `python jobs/evaluate.py` puts jobs/ first on sys.path, where evaluate.py, pipeline.py ... would
# shadow libraries of the same name; swap it for the repository root so that the tiger_ray next to
# these files (the code shipped as the job's working_dir) is the one imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != JOBS_DIR]
sys.path.insert(0, str(REPO))

STAGE_DIR_ENV = "TIGER_STAGE_DIR"
# Commands whose processes keep reading the run after the job's command returns: `tiger serve
# --detach` leaves replicas behind that load from it, so a temporary working copy will not do.
KEEPS_READING_RUN = {"serve"}
# Set by Ray's job supervisor in the entrypoint's environment: the job's runtime_env and metadata.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class _CommandFailed(Exception):
    """Raised inside the staging block so that a failed command uploads nothing."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("job options")
    group.add_argument("--stage-dir", default=os.environ.get(STAGE_DIR_ENV), metavar="DIR",
                       help="keep the local working copy of a --run URI here between jobs "
                            f"(default: ${STAGE_DIR_ENV}, else a temporary directory); on a "
                            "multi-node cluster, a path every node mounts")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def command_parser(command: str, prog: str) -> argparse.ArgumentParser:
    """The `tiger <command>` parser itself, renamed to ``prog``, with the job options added."""
    from tiger_ray import cli

    subparsers = argparse.ArgumentParser(prog="tiger").add_subparsers()
    for module in cli.COMMANDS:
        module.register(subparsers)
    if command not in subparsers.choices:
        raise SystemExit(f"{prog}: `tiger {command}` does not exist in this version of tiger_ray")
    parser = subparsers.choices[command]
    parser.prog = prog
    parser.description = ((parser.description or "") + " Submitted as a Ray job, --run may be a "
                          "URI (s3://, gs://, file:// ...): the run is staged locally and the "
                          "results are uploaded when the command succeeds.").strip()
    _add_job_options(parser)
    return parser


def _job_working_dir() -> str | None:
    """The runtime_env working_dir of the Ray job this process is the entrypoint of, if any."""
    try:
        config = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}"))
    except ValueError:
        return None
    return (config.get("runtime_env") or {}).get("working_dir")


def replace_location(argv: list[str], old: str, new: str) -> list[str]:
    """``argv`` with the run location ``old`` (``--run old`` or ``--run=old``) replaced by ``new``."""
    out = []
    for arg in argv:
        if arg == old:
            arg = new
        elif arg.startswith("--") and arg.endswith("=" + old):
            arg = arg[: -len(old)] + new
        out.append(arg)
    return out


def main(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    from tiger_ray import cli, storage

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python jobs/{Path(sys.argv[0]).name}"
    job_only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_job_options(job_only)
    job, command_argv = job_only.parse_known_args(argv)
    # Full validation (and --help) by the command's own parser before anything is staged.
    args = command_parser(command, prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if job.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tiger_argv = (["-v"] if job.verbose else []) + [command, *command_argv]

    location = getattr(args, "run", None)
    if location is None or not storage.is_uri(location):
        if location is not None and not Path(location).expanduser().is_absolute() and _job_working_dir():
            print(f"{prog}: error: --run {location} is a relative path, and a Ray job runs in a "
                  "temporary copy of its working_dir that is deleted afterwards; give an absolute "
                  "path on the cluster (a shared mount on a multi-node cluster) or a URI",
                  file=sys.stderr)
            return 2
        return cli.main(tiger_argv)
    if command in KEEPS_READING_RUN and not job.stage_dir:
        print(f"{prog}: error: `tiger {command}` reads the run for as long as the service is up; "
              f"with --run {location} give --stage-dir (or ${STAGE_DIR_ENV}) on a filesystem "
              "every node mounts", file=sys.stderr)
        return 2
    try:
        with storage.staged_run(location, stage_dir=job.stage_dir) as local:
            code = cli.main(replace_location(tiger_argv, location, str(local)))
            if code:
                raise _CommandFailed(code)
    except _CommandFailed as failed:
        print(f"{prog}: `tiger {command}` failed (exit {failed.code}); nothing was uploaded to "
              f"{location}", file=sys.stderr)
        return failed.code
    except ValueError as err:  # an unusable URI, named by tiger_ray.storage (the command's own
        if job.verbose:        # bad-input errors were already turned into exit code 2 by cli.main)
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
