"""tinymnist: tiny CNNs that reach 99.4% on MNIST with fewer than 8,000 parameters."""

import os as _os

# OpenMP threads that spin while they wait turn a second training (or a test suite, or a sweep worker) beside
# this one into a collapse: measured on a 2-core host, two runs together did 10-55% of the work of one run
# alone. Passive waiting keeps them at the work of one run or more, for a smaller cost to a run alone (see the
# README's performance section). It only takes effect before torch is first imported, and a user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
