"""ConDistFL (Wang et al., "ConDistFL: Conditional Distillation for Federated Learning from
Partially Annotated Data", DeCaF 2023, arXiv 2308.04070; reference code: NVIDIA/NVFlare,
research/condist-fl), on this harness: `python -m experiments train --mode fedavg --condist`.

Every site trains the one (1 + K)-class model that FedAvg averages whole. Its loss is
    marginal(site's labels) + w(round) * ConDist(local model, global model),
where the marginal loss merges the organs the site did not label into background (as the
fedavg-marginal baseline), and the conditional distillation teaches the local model what the
global model says about those organs:

- both models' class probabilities, at temperature T = 2, are turned into conditional ones: the
  probability of background and of each organ the site did not label, given that the voxel is
  none of the organs it did label, p_g / (1 - p_labelled + 1e-5);
- they are compared by soft Dice (over the batch, every group one channel, smoothing 1e-5 below
  only) on the voxels that both the site's label and the global model's argmax call none of
  the site's organs: where the site's own annotation says "not mine", the global model says
  what else it is;
- the weight w grows linearly from 0.01 in the first round to 1 in the last.

The global model is the one every site starts a round from (the average of the last round); it
is held fixed (evaluation mode, no gradient) while the local model trains. The reference also
trains with its own recipe (SGD, a cosine schedule, deep supervision, mixed precision); here
every setup trains with the same network, budget, optimiser and augmentation, so the
comparison is of the losses alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

import fl
from common import autocast
from data import ORGAN_ID
from experiments.marginal import marginal_loss
from train import Run
from unet3d import UNet3D

TEMPERATURE = 2.0
WEIGHT_RANGE = (0.01, 1.0)  # of the distillation term, first round to last
EPS = 1e-5  # below the conditional probabilities' denominator, as the reference
SMOOTH_DR = 1e-5  # of the Dice's denominator; the numerator has none, as the reference


def conditional_probabilities(logits: torch.Tensor, labelled: Sequence[int],
                              temperature: float = TEMPERATURE) -> torch.Tensor:
    """(B, G, ...) probability of each group g (background, then every class the site did not
    label, in class order) given that the voxel is none of the `labelled` classes."""
    p = torch.softmax(logits / temperature, dim=1)
    others = [c for c in range(logits.shape[1]) if c not in labelled]
    foreground = p[:, list(labelled)].sum(dim=1, keepdim=True)
    return p[:, others] / (1.0 - foreground + EPS)


def distillation_mask(teacher_logits: torch.Tensor, target: torch.Tensor,
                      labelled: Sequence[int]) -> torch.Tensor:
    """(B, 1, ...) 1 where neither the site's label nor the global model's argmax is one of the
    site's own classes: the voxels whose other organs the global model is asked about."""
    mine = torch.tensor(list(labelled), device=target.device)
    argmax = teacher_logits.argmax(dim=1)
    outside = ~torch.isin(target, mine) & ~torch.isin(argmax, mine)
    return outside[:, None].to(teacher_logits.dtype)


def masked_dice(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per channel over the batch and the masked voxels, averaged over channels
    (MONAI's MaskedDiceLoss with batch=True, smooth_nr=0, smooth_dr=1e-5)."""
    pred, target = pred * mask, target * mask
    dims = (0, *range(2, pred.dim()))
    intersection = (pred * target).sum(dims)
    denominator = pred.sum(dims) + target.sum(dims)
    return (1.0 - 2.0 * intersection / (denominator + SMOOTH_DR)).mean()


def condist_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 labelled: Sequence[int]) -> torch.Tensor:
    """The conditional distillation term of a site that labelled `labelled` classes."""
    mask = distillation_mask(teacher_logits, target, labelled)
    student = conditional_probabilities(logits, labelled)
    teacher = conditional_probabilities(teacher_logits, labelled)
    return masked_dice(student, teacher, mask)


def weight_at(round_index: int, rounds: int) -> float:
    """The distillation term's weight in round `round_index` (0-based) of `rounds`."""
    low, high = WEIGHT_RANGE
    return high if rounds < 2 else low + (high - low) * round_index / (rounds - 1)


def prepare(run: Run) -> None:
    """Give every client of a FedAvg run the ConDistFL loss: one teacher, the global model,
    loaded with the weights a client starts each round from."""
    with torch.random.fork_rng(devices=[]):  # building the teacher must not move the run's RNG
        teacher = UNet3D(run.unet_cfg).to(run.cfg.device, memory_format=torch.channels_last_3d)
    teacher.eval().requires_grad_(False)
    for client in run.clients:
        labelled = [ORGAN_ID[client.name]]
        rounds_done = [0]  # the round the client is in, counted by its losses so far

        def begin(c: fl.Client, rounds_done: list[int] = rounds_done) -> None:
            teacher.load_state_dict(c.model_state)
            rounds_done[0] = len(c.history)

        client.begin = begin
        client.next_batch = with_teacher(client.next_batch, teacher, client.amp)
        client.loss_fn = functools.partial(site_loss, labelled=labelled, rounds_done=rounds_done,
                                           rounds=run.cfg.rounds)


class with_teacher:  # a class so that its teacher can be looked at
    """A site's batches with the global model's logits beside the labels; its pass in the
    client's precision (--amp), the logits in float32 as the student's."""

    def __init__(self, next_batch: Callable[[], fl.Batch], teacher: torch.nn.Module,
                 amp: torch.dtype | None = None):
        self.next_batch, self.teacher, self.amp = next_batch, teacher, amp

    def __call__(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.next_batch()
        with torch.no_grad(), autocast(x.device, self.amp):
            return x, (y, self.teacher(x).float())


def site_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor], labelled: list[int],
              rounds_done: list[int], rounds: int) -> torch.Tensor:
    """The marginal loss on the site's labels plus the weighted distillation term."""
    y, teacher_logits = target
    weight = weight_at(rounds_done[0], rounds)
    distillation = condist_loss(logits, teacher_logits, y, labelled)
    return marginal_loss(logits, y, labelled) + weight * distillation
