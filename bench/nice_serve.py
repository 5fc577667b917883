#!/usr/bin/env python3
"""``orcd serve`` whose engine threads run at a given nice value (the priority experiment).

    python bench/nice_serve.py NICE serve --model PATH [orcd serve flags...]

Until ``--engine-nice`` is wired into orcd's config, the benchmark starts orcd through this
launcher: it makes every ``BatchEngine`` the worker builds take ``nice=NICE`` (see
``BatchEngine.run``), then hands the rest of the command line to ``orcd.cli.main``.
"""

from __future__ import annotations

import functools
import sys


def main(argv: list[str]) -> int:
    import orcd.engine
    from orcd import cli

    nice = int(argv[0])
    orcd.engine.BatchEngine = functools.partial(orcd.engine.BatchEngine, nice=nice)  # type: ignore[misc,assignment]
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
