"""The ``plexrec`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def configure_logging(verbose: bool = False) -> None:
    """plexrec's INFO lines; TorchRec's, fbgemm's and torch's chatter only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("plexrec").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for noisy in ("torchrec", "torch.distributed", "torch.fx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="plexrec",
        description="CTR ranking with multiplexed unified embeddings (TorchRec) and DARE long-sequence attention.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from recsys.train import add_train_arguments
    train = commands.add_parser("train", help="train a ranker, evaluate it, export a versioned model",
                                description="Train on one process (gloo on CPU). For many processes use "
                                            "`torchrun --nproc-per-node N -m recsys.train` with the same flags.")
    add_train_arguments(train)

    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    if args.command == "train":
        from recsys.config import ConfigError
        from recsys.data.schema import DataError
        from recsys.train import CheckpointMismatchError, run_training

        try:
            run_training(args)
        except (ConfigError, DataError, CheckpointMismatchError) as exc:
            sys.exit(f"plexrec train: {exc}")


if __name__ == "__main__":
    main()
