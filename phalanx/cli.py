"""`phalanx` command line: train, data prepare, report, ckpt.

Errors a user can cause print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from torch.distributed.elastic.multiprocessing.errors import record

from phalanx.errors import ConfigError, PhalanxError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phalanx", description="composable parallel training with one-step fault tolerance")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a YAML config (one process, or each rank under torchrun)")
    train.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for user errors")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize text / jsonl / parquet files into token shards and an "
                                               "index.json for data.kind=memmap (a rerun resumes)")
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="files or quoted globs, in order (the older form "
                                                                 "TEXT_FILE OUT.bin writes one .bin of bytes)")
    prep.add_argument("--out", metavar="DIR", help="output folder: shard-NNNNN.bin, index.json, tokenizer files")
    prep.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json or an HF model folder holding one "
                                                          "(default: bytes, vocab 256)")
    prep.add_argument("--field", default="text", help="the text field of jsonl lines or parquet rows (text)")
    prep.add_argument("--eos-token", help="the end-of-text token written after each document "
                                          "(default: the tokenizer's, found by its usual names)")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: the CPUs)")
    prep.add_argument("--shard-tokens", type=int, default=None,
                      help="a shard closes at the first document end at or past this many tokens (134217728)")
    prep.add_argument("--force", action="store_true", help="replace an existing output (or an interrupted one)")

    ray_ = sub.add_parser("ray", help="train on a Ray cluster with failure detection and recovery")
    ray_.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    ray_.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ray_.add_argument("--workers", type=int, default=2, help="trainer processes (one per GPU, else per CPU slot)")
    ray_.add_argument("--address", default=None,
                      help="a running Ray cluster (default: RAY_ADDRESS, else a local cluster on loopback)")

    report = sub.add_parser("report", help="plots and a summary of a run directory")
    report.add_argument("run_dir", help="e.g. runs/tiny")

    ckpt = sub.add_parser("ckpt", help="list, verify and export a run's checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ckpt_ls = ckpt_sub.add_parser("ls", help="persisted steps (verified by checksum) and steps in keeper memory")
    ckpt_ls.add_argument("run_dir", help="e.g. runs/tiny")
    ckpt_verify = ckpt_sub.add_parser("verify", help="check every file against its manifest; exit 1 if any fails")
    ckpt_verify.add_argument("run_dir", help="e.g. runs/tiny")
    ckpt_verify.add_argument("--step", type=int, help="one step (default: every persisted step)")
    ckpt_verify.add_argument("--key", metavar="FILE",
                             help="check signatures with the secret in FILE (another run's) instead of this run's")
    ckpt_verify.add_argument("--trust", action="store_true",
                             help="adopt --step N: if every file verifies, sign it with this run's key so the run "
                                  "resumes from it (for an unsigned checkpoint or one from another run)")
    ckpt_export = ckpt_sub.add_parser("export", help="consolidated model weights: one safetensors file, or a "
                                      "Hugging Face Llama folder (--format hf)")
    ckpt_export.add_argument("run_dir", help="e.g. runs/tiny")
    ckpt_export.add_argument("--step", type=int, help="step to export (default: the newest that verifies)")
    ckpt_export.add_argument("--format", default="safetensors",
                             help="safetensors (one file, phalanx names) or hf (config.json, sharded safetensors "
                                  "and the tokenizer, for transformers' from_pretrained)")
    ckpt_export.add_argument("--out", help="output (default: RUN/export/step-N.safetensors, or RUN/export/step-N-hf)")
    ckpt_export.add_argument("--force", action="store_true", help="replace an existing output")

    from phalanx.planner.plan import add_plan_arguments

    add_plan_arguments(sub.add_parser("plan", help="rank every parallel layout of a config on a cluster; "
                                                   "recommend one and its rank order"))
    return parser


def _train(args: argparse.Namespace) -> int:
    from phalanx.config import to_yaml
    from phalanx.launch.run import rank_config, run_rank
    from phalanx.parallel.dist import env_world

    cfg = rank_config(args.config, args.overrides)
    if args.print_config:
        if env_world()[0] == 0:
            print(to_yaml(cfg), end="")
        return 0
    return run_rank(cfg)


def _data(args: argparse.Namespace) -> int:
    import os

    from phalanx.data.prepare import DEFAULT_SHARD_TOKENS, prepare_bytes, prepare_corpus

    if args.out is None:
        if len(args.inputs) == 2 and args.inputs[1].endswith(".bin"):  # the older one-file form
            meta = prepare_bytes(args.inputs[0], args.inputs[1], force=args.force)
            print(f"wrote {meta['tokens']:,} byte tokens to {args.inputs[1]} (vocab 256, uint16)")
            return 0
        raise PhalanxError(f"name the output folder: phalanx data prepare {' '.join(args.inputs)} --out DIR")
    index = prepare_corpus(args.inputs, args.out, tokenizer=args.tokenizer, field=args.field,
                           workers=args.workers if args.workers is not None else os.cpu_count() or 1,
                           shard_tokens=args.shard_tokens if args.shard_tokens is not None else DEFAULT_SHARD_TOKENS,
                           eos_token=args.eos_token,
                           force=args.force, progress=True)
    print(f"wrote {index['tokens']:,} tokens of {index['documents']:,} documents in {len(index['shards'])} shards "
          f"to {args.out} (vocab {index['vocab_size']:,}, {index['dtype']})")
    return 0


def _ray(args: argparse.Namespace) -> int:
    from phalanx.launch.controller import main as controller_main

    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: need at least 1 worker")
    return controller_main(args.config, args.overrides, args.workers, args.address)


def _report(args: argparse.Namespace) -> int:
    from phalanx.report import report

    print(report(args.run_dir))
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from phalanx.checkpoint import tools

    if args.ckpt_command == "ls":
        print(tools.list_checkpoints(args.run_dir))
        return 0
    if args.ckpt_command == "verify":
        lines, ok = tools.verify_checkpoints(args.run_dir, args.step, args.key, args.trust)
        print("\n".join(lines))
        return 0 if ok else 1
    out, count, nbytes = tools.export_checkpoint(args.run_dir, args.step, args.format, args.out, args.force)
    print(f"wrote {count} tensors ({tools.human_bytes(nbytes)}) to {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from phalanx.planner.plan import plan_command

    return plan_command(args)


@record
def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "ray" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # `phalanx ray CONFIG --workers N key=value ...`: overrides after the options
        args.overrides = [*args.overrides, *extra]
    handler = {"train": _train, "data": _data, "report": _report, "ckpt": _ckpt, "plan": _plan, "ray": _ray}[args.command]
    try:
        return handler(args)
    except PhalanxError as err:
        if args.debug:
            raise
        from phalanx.launch.run import report_error

        return report_error(err)


if __name__ == "__main__":
    sys.exit(main())
