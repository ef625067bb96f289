"""Logging of plexrec's processes (the command line's, training's, the learner's, the benchmarks')."""

from __future__ import annotations

import logging
import warnings


def configure_logging(verbose: bool = False) -> None:
    """plexrec's INFO lines; TorchRec's, fbgemm's and torch's chatter only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("plexrec").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for noisy in ("torchrec", "torch.distributed", "torch.fx", "kafka"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
