"""mer-cli: train and compare multimodal emotion recognition models from Hydra configs."""

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. The LSTM kernels open a
# parallel region per time step; with spinning threads, a CPU shared with anything else (a
# sweep, a test run) made 2-thread training 5-50x slower here (make bench, README). Set
# OMP_WAIT_POLICY=ACTIVE to get spinning back on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
