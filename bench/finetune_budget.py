"""`jobs.finetune` with a `--time-budget` (for bench/stream_bench.py): the same job (Config, validation,
build_setup, model, data modes) plus the one field the training loop already honours
(`jobs.loop.train` reads `cfg.time_budget`), which jobs.augment declares and jobs.finetune does not.

    PYTHONPATH=. python -m bench.finetune_budget --data DIR --weights none --mode scratch --time-budget 10 ...

Ray Train workers import this module by name, so the repo root must be on their PYTHONPATH.
"""
from __future__ import annotations

from dataclasses import dataclass

from jobs import finetune
from jobs.cli import run_cli
from jobs.config import build_parser, option

build_setup = finetune.build_setup
validate = finetune.validate


@dataclass
class Config(finetune.Config):
    time_budget: float | None = option(None, "train for this many seconds of training steps instead of --epochs, "
                                       "then evaluate the whole test set", above=0)


def parse_args(argv=None):
    return build_parser(Config, "python -m bench.finetune_budget", __doc__).parse_args(argv)


def main(argv=None) -> int:
    from jobs import driver

    _, summary, out = driver.run_from_cli("bench.finetune_budget", argv)
    print(f"done: test acc {summary['test_acc']:.3f} after {summary['epochs']} epochs; results in {out}/")
    return 0


if __name__ == "__main__":
    run_cli(main)
