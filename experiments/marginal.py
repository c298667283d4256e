"""The marginal loss (Shi et al., "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation", Medical Image Analysis 2021): a site's loss over the classes it
labelled, with every class it did not label merged into background. An organ the site did not
label is then taught as "not one of this site's organs", never as background.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from data import ORGAN_ID
from settings import Config
from train import Loss, soft_dice


def marginal_loss(
    logits: torch.Tensor, target: torch.Tensor, labelled: Sequence[int]
) -> torch.Tensor:
    """Dice + cross-entropy over background and the `labelled` classes only, with the
    probabilities of every class the site did not label merged into background (Shi et al.
    2021, "marginal loss"): an unlabelled organ is not taught as background, only as "not one
    of the organs this site labelled"."""
    others = [c for c in range(1, logits.shape[1]) if c not in labelled]
    logp = torch.log_softmax(logits, dim=1)
    merged = torch.cat(
        [torch.logsumexp(logp[:, [0, *others]], dim=1, keepdim=True), logp[:, list(labelled)]], 1
    )
    index = torch.zeros(logits.shape[1], dtype=torch.long, device=target.device)
    index[list(labelled)] = torch.arange(1, len(labelled) + 1, device=target.device)
    t = index[target]
    return soft_dice(merged.exp(), t) + F.nll_loss(merged, t)


def marginal_for(cfg: Config, sites: Sequence[str], which: Callable[[], int]) -> Loss:
    """The marginal loss of a client whose batches come from `sites`; `which()` tells which of
    them gave the batch just drawn (the pooled model draws from each site in turn)."""
    per_site = [functools.partial(marginal_loss, labelled=[ORGAN_ID[s]]) for s in sites]
    return lambda logits, target: per_site[which()](logits, target)
