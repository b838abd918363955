"""Check a served model for drift and retrain it on an alarm: what
`ray job submit -- python jobs/monitor.py` runs.

python jobs/monitor.py --model wafer-cnn --storage-root s3://bucket/forgeml [--interval 300]
"""

import sys

from forgeml.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
