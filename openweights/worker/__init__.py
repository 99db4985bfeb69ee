"""The openweights worker: claims jobs from a server over HTTP and runs them.

Light on purpose (no torch, no server imports): it runs on GPU pods and in CPU-only installs.
`python -m openweights.worker --url … --token …` or `ow worker` start one.
"""

from openweights.worker._worker import Worker, run_worker
from openweights.worker.hardware import probe_hardware

__all__ = ["Worker", "probe_hardware", "run_worker"]
