"""The marginal loss: the plain loss when a site labels every organ; an organ a site did not
label is never taught as background."""

import torch

import train
from experiments.marginal import marginal_loss


def test_marginal_loss_is_dice_ce_when_every_organ_is_labelled():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 6, 4)
    target = torch.randint(0, 5, (2, 6, 6, 4))
    torch.testing.assert_close(
        marginal_loss(logits, target, [1, 2, 3, 4]), train.dice_ce_loss(logits, target)
    )


def test_marginal_loss_never_teaches_an_unlabelled_organ_as_background():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, 6, 4, requires_grad=True)
    target = torch.randint(0, 2, (2, 6, 6, 4))  # a liver site: background 0 and liver 1 only
    loss = marginal_loss(logits, target, [1])
    loss.backward()
    g, p = logits.grad, torch.softmax(logits.detach(), 1)
    # within the merged group {background, spleen, pancreas, kidneys} the gradient only moves
    # the group's total: each member's gradient is proportional to its probability
    for organ in (2, 3, 4):
        torch.testing.assert_close(
            g[:, organ] * p[:, 0], g[:, 0] * p[:, organ], atol=1e-9, rtol=1e-5
        )
    # so swapping an unlabelled organ's logit with background's leaves the loss unchanged...
    swapped = logits.detach().clone()
    swapped[:, [0, 2]] = swapped[:, [2, 0]]
    torch.testing.assert_close(marginal_loss(swapped, target, [1]), loss.detach())
    # ...which the ordinary loss, teaching the spleen as background, does not
    assert not torch.allclose(
        train.dice_ce_loss(swapped, target), train.dice_ce_loss(logits.detach(), target)
    )
