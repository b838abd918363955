"""Search hyperparameters and register the best model: `ray job submit -- python jobs/tune.py`.

python jobs/tune.py --config examples/wafer/tune.yaml [--set tune.num_trials=8] [--resume]
"""

import sys

from forgeml.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
