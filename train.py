"""Train SegViz or one of its baselines, then test it on the fully labelled test set.

    python train.py --nodes 4 --mode segviz

Modes (the paper's figure 2):
    single   A  each site trains its own binary model alone
    central  B  one (1 + K)-class model on the pooled data; unlabelled organs count as background
    fedavg   C  the central model trained at each site; every key averaged each round
    segviz   D  shared representation averaged, task heads kept local; --fedbn keeps norms local too

Reading order: unet3d.py (the network), segviz.py (what is shared, the meta-model), fl.py (a
round), config.py (the settings), training.py (the run, top to bottom). Every setup for several
node counts and seeds, the marginal-loss baselines, the oracle and robust aggregation:
`python experiments.py`. The state is saved between rounds; `python train.py --resume OUT`
continues a killed run.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import fail
from config import add_config_arguments, config_of, resumed_config
from training import STATE_FILE, load_state, train_seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_config_arguments(p)
    p.add_argument("--resume", metavar="OUT",
                   help="continue the run whose state OUT/state.pt holds, with its own settings (--device and a "
                        "larger --rounds may be given)")
    a = p.parse_args(argv)
    if a.resume:
        state = load_state(os.path.join(a.resume, STATE_FILE))
        if state["extensions"]:
            fail(f"--resume {a.resume}: the run was made by experiments.py; resume it with "
                 f"python experiments.py train --resume {a.resume}")
        cfg = resumed_config(state["config"], a.resume, argv, a, p)
        return train_seeds(cfg, [cfg.seed], resume=True)
    return train_seeds(config_of(a, p), a.seeds)


if __name__ == "__main__":
    sys.exit(main())
