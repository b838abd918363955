"""Serve registered models over HTTP with Ray Serve (blocks until interrupted).

FORGEML_SERVE_TOKEN=... python jobs/serve.py --model wafer-cnn [--model wafer-cnn:v1] [--port 8000]
"""

import sys

from forgeml.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "run", *sys.argv[1:]]))
