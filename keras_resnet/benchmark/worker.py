"""The benchmark's subprocess: ``python -m keras_resnet.benchmark.worker [measure JOB OUT]``.

See :mod:`keras_resnet.benchmark.runners`. Nothing imports this module, so running it as
``__main__`` never loads a second copy of it.
"""

from __future__ import annotations

import sys

from keras_resnet.benchmark.runners import MODULE, measure_main, worker_main


def main(argv: list[str]) -> int:
    if not argv:
        return worker_main()
    if argv[0] == "measure" and len(argv) == 3:
        return measure_main(argv[1], argv[2])
    print(f"usage: python -m {MODULE} [measure JOB.json OUT.json]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
