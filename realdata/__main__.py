"""python -m realdata COMMAND: inspect a download, write a synthetic federation, segment scans,
score predictions.

    python -m realdata inspect --data-root DIR    # check the folders before a long run
    python -m realdata synth OUT                  # a synthetic federation in the official layouts
    python -m realdata predict -i SCANS -o LABELS --checkpoint OUT/model.pt
    python -m realdata score -p PRED -l LABELS    # Dice, HD95, NSD per case: PRED/summary.json
"""

from __future__ import annotations

import sys

COMMANDS = {
    "inspect": "realdata.inspection",
    "synth": "realdata.synth",
    "predict": "realdata.predict",
    "score": "realdata.score",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(
            __doc__.strip(), file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout
        )
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
