"""python -m tokenmill.executor.kernels: build the kernels now (the install script does); exit 1 if they cannot be."""

import logging

from tokenmill.executor.kernels import lowbit

logging.basicConfig(level=logging.INFO, format="%(message)s")
raise SystemExit(0 if lowbit() is not None else 1)
