"""`visiontune`: the VisionTune API from a terminal.

The client commands (datasets, jobs, predict, models) ship with the SDK, so a client-only install
has them without torch. The server's commands (serve, worker, up, migrate, keys) join the same
command when the server is installed: each installed distribution can register a function in the
entry-point group `visiontune.commands`, which gets the subcommands to add its own to (as pytest
and flask take plugins).

The server and key come from `--url` and `--api-key`, else VISIONTUNE_API_URL and
VISIONTUNE_API_KEY. `--json` prints what the API answered, for scripts. An error prints one line
on stderr and exits non-zero: 1 for an error from the API or the network, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, TextIO

from visiontune_client.client import Client
from visiontune_client.errors import APIError, VisionTuneError
from visiontune_client.resources.jobs import ProgressLine
from visiontune_client.types import Event

PLUGIN_GROUP = "visiontune.commands"


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error, and nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except APIError as exc:  # the API's own words, and the request id to quote to an operator
        request = f" (request {exc.request_id})" if exc.request_id else ""
        print(f"visiontune: error: {exc.message} [{exc.status_code} {exc.code}]{request}", file=sys.stderr)
        code = 1
    except (VisionTuneError, OSError) as exc:  # unreachable server, no key, a folder that is not a dataset...
        print(f"visiontune: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_client_commands(commands)
    for plugin in entry_points(group=PLUGIN_GROUP):
        try:
            register = plugin.load()
        except Exception as exc:  # a broken server install must not take the client commands with it
            print(f"visiontune: the commands of {plugin.value} are unavailable: {exc}", file=sys.stderr)
            continue
        register(commands)
    return parser


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the API's base URL (default: VISIONTUNE_API_URL, else http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="the API key (default: VISIONTUNE_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the API's JSON answers, for scripts")

    def command(group: argparse._SubParsersAction, name: str, run: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    datasets = commands.add_parser("datasets", help="upload and list datasets").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    upload = command(datasets, "upload", datasets_upload, "upload a folder in ImageFolder layout (packed on the way) "
                     "or an archive, and wait until the server has checked it")  # fmt: skip
    upload.add_argument("path")
    upload.add_argument("--name", help="a name for the dataset (default: the file or folder name)")
    upload.add_argument("--no-wait", dest="wait", action="store_false", help="return once uploaded")
    upload.add_argument("--quiet", "-q", action="store_true", help="print only the dataset's id")
    command(datasets, "list", datasets_list, "the newest datasets")
    show = command(datasets, "show", datasets_show, "one dataset")
    show.add_argument("dataset_id")

    jobs = commands.add_parser("jobs", help="train, follow and control jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = command(jobs, "create", jobs_create, "queue a training job")
    create.add_argument("--dataset", required=True, help="the dataset's id")
    create.add_argument("--backbone", default="mobilenetv2_100", help="a timm model name (default: %(default)s)")
    create.add_argument("--strategy", help="auto, linear_probe, partial, full or lp_ft (default: the server's)")
    create.add_argument("--epochs", type=int, help="training epochs (default: the strategy's)")
    create.add_argument("--model-name", help="register the model under this name")
    create.add_argument("--wait", action="store_true", help="follow the job with a live progress line until it "
                        "ends; Ctrl-C asks whether to cancel it")  # fmt: skip
    create.add_argument("--quiet", "-q", action="store_true", help="print only the job's id")
    command(jobs, "list", jobs_list, "the newest jobs")
    show = command(jobs, "show", jobs_show, "one job")
    show.add_argument("job_id")
    logs = command(jobs, "logs", jobs_logs, "a job's events, oldest first")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing events as they happen, until the job ends")
    cancel = command(jobs, "cancel", jobs_cancel, "cancel a queued or running job")
    cancel.add_argument("job_id")

    predict = command(commands, "predict", predict_images, "the top labels of one image or several")
    predict.add_argument("model", help="a model id, name@version or name@alias")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top-k", type=int, help="labels per image (default: the server's, up to 5)")

    models = commands.add_parser("models", help="list, export, download and alias models").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    command(models, "list", models_list, "the newest models")
    show = command(models, "show", models_show, "one model")
    show.add_argument("model")
    export = command(models, "export", models_export, "build an export (ONNX) and wait until it passed its parity check")
    export.add_argument("model")
    export.add_argument("--format", default="onnx")
    download = command(models, "download", models_download, "save a model's artifact (a zip), or an export")
    download.add_argument("model")
    download.add_argument("--output", "-o", help="the file to write (default: <model>.zip, or <model>.<format>)")
    download.add_argument("--format", help="download this ready export (e.g. onnx) instead of the artifact")
    alias = command(models, "alias", models_alias, "point name@alias at a version of the model")
    alias.add_argument("name", help="the model name")
    alias.add_argument("alias", help="e.g. production")
    alias.add_argument("target", help="a version number, or a model id or ref of that name")


def client(args: argparse.Namespace) -> Client:
    return Client(base_url=args.url, api_key=args.api_key)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(rows: list[Sequence[Any]], header: Sequence[str]) -> None:
    """Columns padded to their widest cell, on stdout."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


class Bar:
    """A byte-progress bar on stderr, rewritten in place; silent when stderr is not a terminal.
    (Written here rather than taken from tqdm or rich: the SDK depends on httpx alone.)"""

    def __init__(self, out: TextIO, packing: bool):
        """`packing`: a folder, zipped before the upload (an archive is only uploaded)."""
        self.out, self.label, self.last_done = out, "packing" if packing else "uploading", -1
        self.active = out.isatty()

    def __call__(self, done: int, total: int) -> None:
        if done < self.last_done:  # the callback starts again from 0: packing is over, the upload began
            self.label = "uploading"
        self.last_done = done
        if not self.active or not total:
            return
        width = max(10, min(40, shutil.get_terminal_size().columns - 40))
        filled = int(width * done / total)
        self.out.write(f"\r{self.label:9s} [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:7.1f}/{total / 2**20:.1f} MiB")
        self.out.flush()

    def finish(self) -> None:
        if self.active and self.last_done >= 0:
            self.out.write("\n")
            self.out.flush()


def datasets_upload(args: argparse.Namespace) -> None:
    with client(args) as api:
        bar = Bar(sys.stderr, packing=os.path.isdir(args.path))
        try:
            dataset = api.datasets.upload(args.path, name=args.name, progress=bar)
        finally:
            bar.finish()
        if args.wait:
            print(f"uploaded {dataset.id}; the server is checking it ...", file=sys.stderr)
            dataset = api.datasets.wait(dataset.id)
    if args.quiet:
        return print(dataset.id)
    show_dataset(dataset, args.json)


def show_list(items: list, as_json: bool, header: Sequence[str], row: Callable[[Any], Sequence[Any]]) -> None:
    if as_json:
        return emit_json([item.raw for item in items])
    table([row(item) for item in items], header)


def datasets_list(args: argparse.Namespace) -> None:
    with client(args) as api:
        datasets = api.datasets.list()
    show_list(datasets, args.json, ("ID", "NAME", "STATUS", "IMAGES", "CLASSES"),
              lambda d: (d.id, d.name, d.status, d.num_images, len(d.classes)))  # fmt: skip


def datasets_show(args: argparse.Namespace) -> None:
    with client(args) as api:
        show_dataset(api.datasets.get(args.dataset_id), args.json)


def show_dataset(dataset, as_json: bool) -> None:
    if as_json:
        return emit_json(dataset.raw)
    print(f"dataset {dataset.id} ({dataset.name}): {dataset.status}, {dataset.num_images} images")
    if dataset.classes:
        table([(c.name, c.train, c.val) for c in dataset.classes], ("CLASS", "TRAIN", "VAL"))
    for warning in dataset.warnings or []:
        print(f"warning: {warning}")


def jobs_create(args: argparse.Namespace) -> int:
    hyperparameters = {"epochs": args.epochs} if args.epochs is not None else None
    with client(args) as api:
        job = api.jobs.create(args.dataset, backbone=args.backbone, strategy=args.strategy,
                              hyperparameters=hyperparameters, model_name=args.model_name)  # fmt: skip
        if not args.wait:
            return print(job.id) if args.quiet else show_job(job, args.json)
        print(f"job {job.id} queued; following it (Ctrl-C to stop)", file=sys.stderr)
        try:
            follow_job(api, job.id, None if args.json or args.quiet else ProgressLine(sys.stderr))
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            if ask(f"Cancel job {job.id}? [y/N] "):
                api.jobs.cancel(job.id)
                print(f"job {job.id} cancelled", file=sys.stderr)
            else:
                print(f"job {job.id} goes on; follow it with: visiontune jobs logs --follow {job.id}", file=sys.stderr)
            return 130
        job = api.jobs.get(job.id)
    if args.quiet:
        print(job.id)
    else:
        show_job(job, args.json)
    return 0 if job.status == "succeeded" else 1


def follow_job(api: Client, job_id: str, line: ProgressLine | None) -> None:
    try:
        for event in api.jobs.stream(job_id):
            if line:
                line.update(event)
    finally:
        if line:
            line.finish()


def ask(question: str) -> bool:
    """A yes/no question on the terminal; no when there is no one to answer."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def jobs_list(args: argparse.Namespace) -> None:
    with client(args) as api:
        jobs = api.jobs.list()
    show_list(jobs, args.json, ("ID", "STATUS", "BACKBONE", "STRATEGY", "MODEL"),
              lambda j: (j.id, j.status, j.backbone, j.strategy, j.model_id or ""))  # fmt: skip


def jobs_show(args: argparse.Namespace) -> None:
    with client(args) as api:
        show_job(api.jobs.get(args.job_id), args.json)


def show_job(job, as_json: bool) -> None:
    if as_json:
        return emit_json(job.raw)
    print(f"job {job.id}: {job.status} ({job.backbone}, {job.strategy})")
    for name in ("val_accuracy", "val_accuracy_interval", "macro_f1", "seconds"):
        if job.metrics.get(name) is not None:
            print(f"  {name}: {job.metrics[name]}")
    if job.model_id:
        print(f"  model: {job.model_id}")
    if job.error:
        print(f"  error: {job.error.message} [{job.error.code}]")


def jobs_logs(args: argparse.Namespace) -> None:
    with client(args) as api:
        events = api.jobs.stream(args.job_id) if args.follow else api.jobs.iter_events(args.job_id)
        for event in events:
            if event.id is None and event.type != "end":
                continue  # a stream's live progress events: what `jobs create --wait` shows as its bar
            print(json.dumps(event.raw) if args.json else describe(event), flush=True)


def describe(event: Event) -> str:
    if event.type == "end":
        return f"-- the job ended: {event.data.get('status')}"
    when = event.created_at.strftime("%H:%M:%S") if event.created_at else ""
    details = " ".join(f"{k}={v}" for k, v in event.data.items() if not isinstance(v, (dict, list)))
    return " ".join(part for part in (when, event.type, event.message, details) if part)


def jobs_cancel(args: argparse.Namespace) -> None:
    with client(args) as api:
        show_job(api.jobs.cancel(args.job_id), args.json)


def predict_images(args: argparse.Namespace) -> None:
    with client(args) as api:
        answer = api.models.predict(args.model, args.images, top_k=args.top_k)
    if args.json:
        return emit_json(answer.raw)
    rows = []
    for image, prediction in zip(args.images, answer.predictions, strict=True):
        for rank, label in enumerate(prediction.labels or [], start=1):
            rows.append((image if rank == 1 else "", rank, label.label, f"{label.score:.4f}"))
    table(rows, ("IMAGE", "RANK", "LABEL", "SCORE"))


def models_list(args: argparse.Namespace) -> None:
    with client(args) as api:
        models = api.models.list()
    show_list(models, args.json, ("ID", "NAME", "ALIASES", "BACKBONE", "VAL_ACCURACY"),
              lambda m: (m.id, f"{m.name}@{m.version}", ",".join(m.aliases or []), m.backbone,
                         m.metrics.get("val_accuracy", "")))  # fmt: skip


def models_show(args: argparse.Namespace) -> None:
    with client(args) as api:
        model = api.models.get(args.model)
    if args.json:
        return emit_json(model.raw)
    print(f"model {model.id}: {model.name}@{model.version} ({model.backbone}), classes {', '.join(model.classes)}")
    print(f"  val_accuracy: {model.metrics.get('val_accuracy')}; aliases: {', '.join(model.aliases or []) or 'none'}")


def models_export(args: argparse.Namespace) -> None:
    started = time.monotonic()
    with client(args) as api:
        print(f"exporting {args.model} to {args.format} ...", file=sys.stderr)
        export = api.models.export(args.model, args.format)
    if args.json:
        return emit_json(export.raw)
    print(f"{export.format} export of {export.model_id}: {export.status}, {export.size_bytes} bytes, "
          f"parity {export.parity} ({time.monotonic() - started:.0f} s)")  # fmt: skip


def models_download(args: argparse.Namespace) -> None:
    with client(args) as api:
        if args.format:
            path = api.models.download_export(args.model, args.format, args.output or f"{args.model}.{args.format}")
        else:
            path = api.models.download(args.model, args.output or f"{args.model}.zip")
    if args.json:
        return emit_json({"path": str(path), "size_bytes": path.stat().st_size})
    print(f"saved {path} ({path.stat().st_size} bytes)")


def models_alias(args: argparse.Namespace) -> None:
    target: int | str = int(args.target) if args.target.isdigit() else args.target
    with client(args) as api:
        alias = api.models.set_alias(args.name, args.alias, target)
    if args.json:
        return emit_json(alias.raw)
    print(f"{args.name}@{args.alias} -> version {alias.version}")


if __name__ == "__main__":
    main()
