"""SegViz: one multi-organ segmenter from sites that each annotated a different organ.

The idea in three steps (Kanhere et al., SegViz):

1. Every site trains the same 3D U-Net, split into a representation block (`rep.*`, the
   encoder and most of the decoder) and a task block (`task.*`, the last decoder stage and
   the output layer). A site's task block is a binary head for the one organ it labelled.
2. Selective aggregation: after each round of local training only the representation keys
   are averaged across sites (`shared_keys`). Task blocks never leave their site. The FedBN
   variant also keeps every normalisation layer local, so each site keeps its own feature
   statistics.
3. The meta-model is the shared representation with every site's head on top: one forward
   pass of the representation, one head per organ, and the organ probabilities merged into a
   single label map (`merge`).

The baselines of the paper's figure 2 use the same machinery with other choices, and `MODES`
is the one table of them: what each mode shares, whether it trains binary site models or one
(1 + K)-class model, and how its output is scored. No other module decides these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from data import window
from fl import State, average
from unet3d import UNet3D, UNetConfig

REP_PREFIX = "rep."
TASK_PREFIX = "task."


@dataclass(frozen=True)
class Mode:
    """One training setup of the paper's figure 2."""

    figure: str  # its panel in the paper's figure 2
    # one binary model per site (its organ against the rest), else one (1 + K)-class model
    binary: bool
    shares: str  # what is averaged each round: "none", "rep" (the representation block) or "all"
    pooled: bool  # one model trained on the pooled data of every site (no federation)
    # how its output is scored, the first for its tables: "heads" (each binary head alone on its
    # organ), "merged" (the heads merged into one label map), "classes" (the argmax of 1 + K
    # classes)
    scorings: tuple[str, ...]


MODES = {
    "single": Mode("A", binary=True, shares="none", pooled=False, scorings=("heads", "merged")),
    "central": Mode("B", binary=False, shares="none", pooled=True, scorings=("classes",)),
    "fedavg": Mode("C", binary=False, shares="all", pooled=False, scorings=("classes",)),
    "segviz": Mode("D", binary=True, shares="rep", pooled=False, scorings=("merged", "heads")),
}
GLOBAL = "global"  # what a multi-class mode keeps: one model, under this name


def is_norm_key(key: str) -> bool:
    """Parameters and statistics of normalisation layers (named `norm*` in unet3d)."""
    return any(part.startswith("norm") for part in key.split("."))


def shared_keys(state: Mapping[str, torch.Tensor], mode: str, fedbn: bool = False,
                parameters: set[str] | None = None) -> list[str]:
    """The state-dict keys a site sends for averaging in each training mode.

    `parameters`: share only these keys (the model's parameter names), so buffers such as
    BatchNorm's running statistics stay local, as in the original, which averaged
    `named_parameters()`."""
    shares = MODES[mode].shares
    if shares == "none":
        return []
    keys = list(state) if shares == "all" else [k for k in state if k.startswith(REP_PREFIX)]
    if fedbn:
        keys = [k for k in keys if not is_norm_key(k)]
    if parameters is not None:
        keys = [k for k in keys if k in parameters]
    return keys


def split_state(state: State) -> tuple[State, State]:
    """(representation block, task block) of a full model state."""
    rep = {k: v for k, v in state.items() if k.startswith(REP_PREFIX)}
    task = {k: v for k, v in state.items() if k.startswith(TASK_PREFIX)}
    if len(rep) + len(task) != len(state):
        raise ValueError("state has keys outside rep./task.")
    return rep, task


class MetaModel(nn.Module):
    """Binary site models merged into one multi-organ segmenter.

    Input: CT patches in HU (B, 1, X, Y, Z). Each organ's model sees the patch through the
    intensity window it was trained with. Output: (B, K, X, Y, Z), channel k organ k's
    foreground probability. Blend these over sliding windows first, then `merge` them into
    one label map.

    With `shared_rep`, all sites hold the same representation (plain SegViz): it runs once per
    distinct window and each head reuses its features. Otherwise (FedBN, independent
    single-site models, or sites whose normalisation statistics stayed local) every site's
    model runs whole.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        site_states: Mapping[str, State],
        windows: Mapping[str, tuple],
        shared_rep: bool,
    ):
        super().__init__()
        self.organs = list(site_states)
        self.windows = {o: tuple(windows[o]) for o in self.organs}
        self.shared_rep = shared_rep
        self.models = nn.ModuleDict()
        for organ, state in site_states.items():
            model = UNet3D(cfg)
            model.load_state_dict(state)
            self.models[organ] = model
        if shared_rep:
            reps = [split_state(s)[0] for s in site_states.values()]
            for rep in reps[1:]:
                for k, v in rep.items():
                    if not torch.equal(v, reps[0][k]):
                        raise ValueError(
                            f"sites disagree on shared key {k}; not a SegViz meta-model"
                        )

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """(B, K, ...) foreground probability of each organ from its own head."""
        probs = []
        cache: dict[tuple, tuple] = {}
        rep_model = self.models[self.organs[0]]
        for organ in self.organs:
            x = window(hu.clone(), self.windows[organ])
            model = self.models[organ]
            if self.shared_rep:
                key = self.windows[organ]
                if key not in cache:
                    cache[key] = rep_model.features(x)
                logits = model.head(*cache[key])
            else:
                logits = model(x)
            probs.append(torch.softmax(logits, dim=1)[:, 1])
        return torch.stack(probs, dim=1)


def merge(organ_probs: torch.Tensor) -> torch.Tensor:
    """(K, ...) blended organ probabilities -> (1 + K, ...) scores whose argmax is the label map.

    Background is what no organ claims, 1 - max_k p_k, so a voxel goes to the most probable
    organ when that probability exceeds 0.5. Derived after blending: taken per sliding window
    and then averaged, a voxel where windows disagree could go to an organ that none of them
    gave more than a half.
    """
    background = 1 - organ_probs.max(dim=0, keepdim=True).values
    return torch.cat([background, organ_probs], dim=0)


def kept_states(mode: str, client_states: Mapping[str, State]) -> dict[str, State]:
    """What a run keeps of its clients: each site's model (binary modes), else the one global
    model (`global_state`)."""
    if MODES[mode].binary:
        return dict(client_states)
    return {GLOBAL: global_state(list(client_states.values()))}


def global_state(states: Sequence[State]) -> State:
    """The global model of a multi-class mode: what every client holds after a round, where they
    hold the same. Where they differ, the mean of every key: the parameters are the average
    already, and normalisation statistics that stayed local (--no-share-buffers, as the
    original averaged parameters only) are averaged once, at the end, so that no one site's
    statistics stand for all (the original built no global model to copy; docs/paper-preset.md)."""
    first = states[0]
    if all(torch.equal(s[k], first[k]) for s in states[1:] for k in first):
        return first
    return average(states)


def site_state(mode: str, states: Mapping[str, State], site: str) -> State:
    """The model a site holds, from what a run keeps: its own, or the global one."""
    return states[site] if MODES[mode].binary else states[GLOBAL]


def site_model(cfg: UNetConfig, mode: str, site: str, state: State, window_hu: tuple) -> nn.Module:
    """The model one site holds, HU in: its own binary model (single, segviz), or the one
    (1 + K)-class model, each seen through the site's window."""
    if MODES[mode].binary:
        return MetaModel(cfg, {site: state}, {site: window_hu}, shared_rep=False)
    return MultiClassModel(cfg, state, window_hu)


def trained_model(
    cfg: UNetConfig,
    mode: str,
    states: Mapping[str, State],
    windows: Mapping[str, tuple],
    shared_rep: bool,
) -> nn.Module:
    """The model a run tests, HU in: binary sites' models merged into the meta-model (each head
    through its own site's window, as it trained), else the one multi-class model."""
    if MODES[mode].binary:
        return MetaModel(cfg, states, {site: windows[site] for site in states}, shared_rep)
    return MultiClassModel(cfg, states[GLOBAL], next(iter(windows.values())))


class MultiClassModel(nn.Module):
    """A (1 + K)-class network (central, fedavg) behind the same HU-in interface: its softmax."""

    def __init__(self, cfg: UNetConfig, state: State, window_hu: tuple):
        super().__init__()
        self.net = UNet3D(cfg)
        self.net.load_state_dict(state)
        self.window = tuple(window_hu)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(window(hu.clone(), self.window)), dim=1)
