"""Train, evaluate and register a model: what `ray job submit -- python jobs/train.py` runs.

python jobs/train.py --config examples/wafer/config.yaml [--set train.max_epochs=3] [--resume]
"""

import sys

from forgeml.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
