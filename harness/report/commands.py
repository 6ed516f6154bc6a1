"""``harness eval``, ``harness report`` and ``harness compare``: arguments -> library calls.

The dispatcher imports this module for all three; ``add_arguments``/``run`` pick the command from
the program name argparse was given (``harness eval`` etc.).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def _command(parser_or_args) -> str:
    prog = getattr(parser_or_args, "prog", None) or getattr(parser_or_args, "_command", "")
    return prog.split()[-1] if prog else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cmd = _command(parser)
    parser.set_defaults(_command=cmd)
    if cmd == "eval":
        parser.add_argument("suite", help="eval suite YAML (eval/quick.yaml, eval/full.yaml, eval/tiny-cpu.yaml)")
        parser.add_argument("--base", required=True, help="the base checkpoint (hub id, diffusers folder, .safetensors)")
        parser.add_argument("--candidate", action="append", required=True, metavar="CKPT",
                            help="a fine-tuned checkpoint; repeat for several")
        parser.add_argument("--data", help="dataset folder whose held-out split gives in-domain prompts and references")
        parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a suite key, e.g. --set ci.n_boot=200 --set models.clip=DIR")
        parser.add_argument("--train-run", help="training run folder (its metrics.jsonl goes into the report)")
        parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's accelerator)")
        parser.add_argument("--allow-pickle", action="store_true",
                            help="allow .ckpt/.pt checkpoints (unpickling runs code from the file)")
        parser.add_argument("--no-report", action="store_true", help="skip writing report.html")
        parser.add_argument("--strict", action="store_true",
                            help="exit 2 when a gate cannot be evaluated (its metric has no value); default: warn")
    elif cmd == "report":
        parser.add_argument("run_dir", help="a run folder written by 'harness eval'")
        parser.add_argument("--train-run", help="training run folder whose metrics.jsonl to plot")
        parser.add_argument("--out", help="where to write the HTML (default RUN_DIR/report.html)")
    elif cmd == "compare":
        parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="eval run folders (e.g. one per checkpoint)")
        parser.add_argument("--out", help="folder for compare.html, compare.csv and the plots (default: print only)")
        parser.add_argument("--metric", action="append", help="only these metrics (default: all)")


def run(args) -> int:
    cmd = _command(args)
    if cmd == "eval":
        return _eval(args)
    if cmd == "report":
        from harness.report.html import write_report

        path = write_report(args.run_dir, train_run=args.train_run, out=args.out)
        print(path)
        return 0
    if cmd == "compare":
        from harness.report.compare import compare_runs

        text, written = compare_runs(args.run_dirs, out=args.out, metrics=args.metric)
        print(text)
        for p in written:
            print(p)
        return 0
    raise SystemExit(f"harness.report.commands: unknown command {cmd!r}")  # a dispatcher bug


def _eval(args) -> int:
    from harness.eval.gates import format_table
    from harness.report.evaluate import run_eval

    res = run_eval(args.suite, base=args.base, candidates=args.candidate, out=args.out, data=args.data,
                   overrides=args.overrides, train_run=args.train_run, device=args.device,
                   allow_pickle=args.allow_pickle, report=not args.no_report)
    if res.results is None:  # not the main process: it only generated
        return 0
    print(f"results: {res.run_dir / 'results.json'}")
    if res.report:
        print(f"report:  {res.report}")
    print(f"images generated: {res.generated}, reused: {res.skipped}")
    if res.not_evaluated:
        log.warning("%d gate check(s) not evaluated (their metric has no value):\n%s", len(res.not_evaluated),
                    format_table(res.not_evaluated))
    if res.failed:
        print(f"\n{len(res.failed)} gate(s) FAILED:", file=sys.stderr)
        print(format_table(res.failed), file=sys.stderr)
    elif res.results.get("gates") and not res.not_evaluated:
        print(f"all {len(res.results['gates'])} gate checks passed")
    if args.strict and res.not_evaluated and not res.failed:
        return 2
    return res.exit_code
