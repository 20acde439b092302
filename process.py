"""Grand-challenge entrypoint: read inputs.json, dispatch on the interface slug, write the track's output.

    python process.py [--input /input] [--output /output] [--config FILE] [--debug]
"""

from midog.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
