"""Worker side of `ow.weighted_sft`: `python -m openweights.jobs.weighted_sft.entry`."""

import sys

from openweights.jobs.fine_tuning.entry import main
from openweights.jobs.weighted_sft import WeightedSFTConfig

if __name__ == "__main__":
    sys.exit(main(WeightedSFTConfig, weighted=True))
