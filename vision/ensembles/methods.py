"""Ensemble methods as small modules with one interface, picked by name from `METHODS`.

Every method is an `nn.Module` with
- `forward(x [B, C_in, H, W]) -> [M, B, C]` member logits (eval mode: what is evaluated);
- `training_loss(minibatches, step, total_steps) -> (loss, logs)` on one minibatch per source domain
  (`[(x_d, y_d)]`, DomainBed layout; most methods concatenate them, Fishr uses the domains);
- `soup() -> nn.Module | None` the uniform weight soup as one model returning `[1, B, C]`, or None, and
  `soup_note`, the reason when there is none.

Methods (methods.md §5):
- `deep`: M independent members (own featurizer + head), mean CE.
- `shallow`: one shared frozen featurizer (ERM-pretrained for `backbone_steps`, or loaded from
  `pretrained`) and M heads (linear, or 2-layer MLPs as SED's "last 2 layers").
- `sed`, `gncl`, `ncl`, `balanced`, `sdde`, `attribution`, `fishr`: the same members (deep, or shallow with
  `frozen_backbone: true`: SED's partial-diversification mode) trained with `ensemble_ce + λ · diversity`
  (see `vision.ensembles.losses`; λ = 0 is exactly the deep-ensemble loss).
- `packed`: Packed-Ensembles (`vision.ensembles.packed`), `mixmo`: MixMo (`vision.ensembles.mixmo`),
  `dice`: DICE (VCEB members + adversarial conditional-redundancy discriminator).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from soups.registry import Registry
from soups.selection import uniform_soup
from soups.utils import SoupsError
from vision.ensembles import losses as L
from vision.ensembles.mixmo import MixMoNet, cut_probability, mixmo_loss
from vision.ensembles.packed import packed_digits_cnn, packed_resnet18
from vision.fishr import EmaVariance, classifier_sample_grads, fishr_penalty, gradient_variance
from vision.models import DigitsCNN, build_featurizer

Minibatches = Sequence[tuple[Tensor, Tensor]]
Logs = dict[str, float]


def _f(t: Tensor) -> float:
    """A detached scalar for logs."""
    return float(t.detach())

# ----------------------------------------------------------------------------------------------------------------
# Featurizer helpers: spatial maps (for Grad-CAM) and pooled features
# ----------------------------------------------------------------------------------------------------------------


def spatial_features(featurizer: nn.Module, x: Tensor) -> Tensor:
    """The last convolutional feature map `[B, K, H, W]` of a featurizer (DigitsCNN or a timm CNN).

    Raises:
        SoupsError: the featurizer has no spatial map (e.g. a ViT), so Grad-CAM is undefined.
    """
    if isinstance(featurizer, DigitsCNN):
        return featurizer.body[:-2](x)
    if hasattr(featurizer, "forward_features"):
        out = featurizer.forward_features(x)
        if out.ndim == 4:
            return out
    raise SoupsError(f"{type(featurizer).__name__} gives no [B, K, H, W] feature map; SDDE's Grad-CAM needs a CNN")


def pool_features(featurizer: nn.Module, spatial: Tensor) -> Tensor:
    """`[B, K, H, W]` feature map → `[B, D]` pooled features, as the featurizer's own forward does."""
    if isinstance(featurizer, DigitsCNN):
        return featurizer.body[-2:](spatial)
    return featurizer.forward_head(spatial, pre_logits=True)


def make_head(in_features: int, num_classes: int, layers: int) -> nn.Module:
    """A linear head (`layers = 1`) or a 2-layer MLP head (`layers = 2`, SED's "last 2 layers")."""
    if layers == 1:
        return nn.Linear(in_features, num_classes)
    if layers == 2:
        return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, num_classes))
    raise SoupsError(f"head_layers must be 1 or 2, got {layers}")


def count_parameters(module: nn.Module) -> int:
    """All parameters (trainable or frozen): what inference holds in memory."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Member ensembles: deep, shallow and the diversity losses on top of them
# ----------------------------------------------------------------------------------------------------------------


class MemberEnsemble(nn.Module):
    """M members = (featurizer, head); featurizers are independent (deep) or one shared frozen one (shallow).

    Args:
        featurizers: M featurizers, or one shared featurizer (frozen here).
        heads: M heads mapping `[B, D]` to `[B, C]`.
        diversity: Name of the diversity term: none, sed, gncl, ncl, balanced, sdde, attribution, fishr.
        lam: λ, weight of the diversity term.
        options: Method options (`sed_pair_size`, `sdde_border`, `fishr_ema`, `fishr_anneal_steps`,
            `ncl_outputs`, `attribution_normalize`).
        seed: Seed of the method's own random draws (SED pairs).
    """

    def __init__(self, featurizers: Sequence[nn.Module], heads: Sequence[nn.Module], diversity: str = "none",
                 lam: float = 0.0, options: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if len(featurizers) not in (1, len(heads)):
            raise SoupsError(f"need 1 shared or {len(heads)} featurizers, got {len(featurizers)}")
        self.featurizers = nn.ModuleList(featurizers)
        self.heads = nn.ModuleList(heads)
        self.shared = len(featurizers) == 1 and len(heads) > 1
        if self.shared:
            self.featurizers.requires_grad_(False)
        self.num_members = len(heads)
        self.diversity, self.lam = diversity, float(lam)
        self.options = dict(options or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.fishr_emas: list[list[EmaVariance]] = []
        self.soup_note = "" if self.shared else (
            "members have independent random inits: no shared basin, their weight average is not a model")

    def train(self, mode: bool = True) -> MemberEnsemble:
        super().train(mode)
        if self.shared:  # the frozen backbone keeps its BatchNorm statistics
            self.featurizers.eval()
        return self

    def member_features(self, x: Tensor) -> list[Tensor]:
        """M pooled feature tensors `[B, D]` (the shared one repeated)."""
        if self.shared:
            return [self.featurizers[0](x)] * self.num_members
        return [f(x) for f in self.featurizers]

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C_in, H, W]` → `[M, B, C]`."""
        return torch.stack([h(f) for h, f in zip(self.heads, self.member_features(x))])

    # -- losses -------------------------------------------------------------------------------------------------

    def training_loss(self, minibatches: Minibatches, step: int, total_steps: int) -> tuple[Tensor, Logs]:
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        if self.diversity == "sdde":
            return self._sdde_loss(x, y)
        if self.diversity == "attribution":
            return self._attribution_loss(x, y)
        if self.diversity == "fishr":
            return self._fishr_loss(x, y, [len(b[1]) for b in minibatches], step)
        logits = self(x)
        base = L.ensemble_ce(logits, y)
        if self.diversity == "none" or self.lam == 0:
            return base, {"loss": _f(base), "ce": _f(base)}
        if self.diversity == "sed":
            pair = L.random_pair(self.num_members, self.generator, int(self.options.get("sed_pair_size", 2)))
            div = L.sed_diversity(logits, y, pair)
            loss = base + self.lam * div
        elif self.diversity == "gncl":
            div = L.gncl_penalty(logits, "ce")
            loss = base - self.lam / self.num_members * div
        elif self.diversity == "ncl":
            div = L.ncl_penalty(logits) if self.options.get("ncl_outputs", "probs") == "probs" else (
                L.gncl_penalty(logits, "identity"))
            loss = base - self.lam / self.num_members * div
        elif self.diversity == "balanced":
            loss = L.balanced_loss(logits, y, self.lam)
            div = F.cross_entropy(logits.mean(0), y)
        else:
            raise SoupsError(f"unknown diversity term {self.diversity!r}; valid: none, sed, gncl, ncl, balanced, "
                             "sdde, attribution, fishr")
        return loss, {"loss": _f(loss), "ce": _f(base), "diversity": _f(div)}

    def _sdde_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        """mean CE + λ · mean pairwise cosine of Grad-CAM maps (true-class logit, double backprop)."""
        feats = [self.featurizers[0]] * self.num_members if self.shared else list(self.featurizers)
        logits, cams = [], []
        shared_map = spatial_features(feats[0], x) if self.shared else None
        for featurizer, head in zip(feats, self.heads):
            fmap = shared_map if shared_map is not None else spatial_features(featurizer, x)
            if not fmap.requires_grad:  # frozen backbone: Grad-CAM still needs ∂z/∂A
                fmap = fmap.detach().requires_grad_(True)
            z = head(pool_features(featurizer, fmap))
            logits.append(z)
            if self.lam != 0:
                target = z.gather(1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(target, fmap, create_graph=True)
                cams.append(L.grad_cam(fmap, grad))
        stacked = torch.stack(logits)
        base = L.ensemble_ce(stacked, y)
        if self.lam == 0:
            return base, {"loss": _f(base), "ce": _f(base)}
        div = L.saliency_cosine(torch.stack(cams), border=int(self.options.get("sdde_border", 1)))
        loss = base + self.lam * div
        return loss, {"loss": _f(loss), "ce": _f(base), "diversity": _f(div)}

    def _attribution_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        """mean CE − λ · attribution variance of |∂z_y/∂x| (unit-normalised) across members (double backprop)."""
        x = x.detach().requires_grad_(self.lam != 0)
        logits = self(x)
        base = L.ensemble_ce(logits, y)
        if self.lam == 0:
            return base, {"loss": _f(base), "ce": _f(base)}
        grads = [torch.autograd.grad(z.gather(1, y[:, None]).sum(), x, create_graph=True)[0] for z in logits]
        normalize = bool(self.options.get("attribution_normalize", True))
        div = L.attribution_variance(torch.stack(grads), normalize=normalize)
        loss = base - self.lam * div
        return loss, {"loss": _f(loss), "ce": _f(base), "diversity": _f(div)}

    def _fishr_loss(self, x: Tensor, y: Tensor, sizes: list[int], step: int) -> tuple[Tensor, Logs]:
        """mean CE + λ · mean over members of the Fishr penalty on each member's last linear layer."""
        feats = self.member_features(x)
        logits = torch.stack([h(f) for h, f in zip(self.heads, feats)])
        base = L.ensemble_ce(logits, y)
        if self.lam == 0:
            return base, {"loss": _f(base), "ce": _f(base)}
        if not all(isinstance(h, nn.Linear) for h in self.heads):
            raise SoupsError("fishr needs linear heads (head_layers: 1): its gradients are taken in the last layer")
        if not self.fishr_emas:
            ema = float(self.options.get("fishr_ema", 0.95))
            self.fishr_emas = [[EmaVariance(ema) for _ in sizes] for _ in range(self.num_members)]
        penalties = []
        for m in range(self.num_members):
            grads = torch.split(classifier_sample_grads(feats[m], logits[m], y), sizes)
            penalties.append(fishr_penalty([e.update(gradient_variance(g)) for e, g in zip(self.fishr_emas[m], grads)]))
        div = torch.stack(penalties).mean()
        weight = self.lam if step >= int(self.options.get("fishr_anneal_steps", 0)) else 0.0
        loss = base + weight * div
        return loss, {"loss": _f(loss), "ce": _f(base), "diversity": _f(div)}

    # -- soup ---------------------------------------------------------------------------------------------------

    def soup(self) -> nn.Module | None:
        """Shared featurizer + the uniform soup of the heads (`soups.selection.uniform_soup`); None for deep."""
        if not self.shared:
            return None
        head = copy.deepcopy(self.heads[0])
        head.load_state_dict(uniform_soup([h.state_dict() for h in self.heads], progress=False))
        return _SingleModel(nn.Sequential(self.featurizers[0], head))


class _SingleModel(nn.Module):
    """Wraps a `[B, C]` classifier as a one-member ensemble `[1, B, C]`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------
# Packed-Ensembles and MixMo
# ----------------------------------------------------------------------------------------------------------------


class PackedEnsemble(nn.Module):
    """Packed-Ensembles trained with the mean member CE (every member sees the same batch)."""

    soup_note = ("members are disjoint channel groups of one network with independent random inits: there is "
                 "no shared init to interpolate around, so a weight soup is meaningless")

    def __init__(self, net: nn.Module, num_members: int) -> None:
        super().__init__()
        self.net, self.num_members = net, num_members

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_loss(self, minibatches: Minibatches, step: int, total_steps: int) -> tuple[Tensor, Logs]:
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        loss = L.ensemble_ce(self(x), y)
        return loss, {"loss": _f(loss), "ce": _f(loss)}

    def soup(self) -> None:
        return None


class MixMoEnsemble(nn.Module):
    """MixMo (linear / cut mixing, w_r, Dirichlet κ, patch schedule, batch repetition)."""

    soup_note = "MixMo members share one core network already; only their input convolutions and heads differ"

    def __init__(self, net: MixMoNet, options: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__()
        self.net, self.num_members = net, net.num_members
        self.options = dict(options)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_loss(self, minibatches: Minibatches, step: int, total_steps: int) -> tuple[Tensor, Logs]:
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        o = self.options
        p_cut = cut_probability(step, total_steps, float(o.get("cut_p0", 0.5)), float(o.get("decay_fraction", 1 / 12)))
        if o.get("mixing", "cut") == "linear":
            p_cut = 0.0
        loss = mixmo_loss(self.net, x, y, p_cut, int(o.get("repetitions", 2)), float(o.get("r", 3.0)),
                          float(o.get("concentration", 2.0)), self.generator)
        return loss, {"loss": _f(loss), "cut_prob": p_cut}

    def soup(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------------
# DICE
# ----------------------------------------------------------------------------------------------------------------


class DiceMember(nn.Module):
    """One DICE member: featurizer → Gaussian encoder e(z|x) (μ, log σ²), classifier d(y|z), class means b(y)."""

    def __init__(self, featurizer: nn.Module, num_classes: int, latent: int) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.encoder = nn.Linear(int(featurizer.num_features), 2 * latent)
        self.classifier = nn.Linear(latent, num_classes)
        self.class_means = nn.Parameter(torch.randn(num_classes, latent) * 0.1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`[B, C_in, H, W]` → μ, log σ² `[B, d]` (log σ² clamped to [−10, 10] for stability)."""
        mu, logvar = self.encoder(self.featurizer(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Eval: classify the mean code μ, `[B, C]`."""
        return self.classifier(self.encode(x)[0])


class DiceEnsemble(nn.Module):
    """DICE: mean_m VCEB_m + δ_cr · L^CR on a random member pair per step, plus the discriminator's BCE.

    One optimiser serves both players: the members' CR term goes through the discriminator with detached
    parameters (`functional_call`), and the discriminator's BCE sees detached codes, so one backward pass
    gives each player the gradient of its own objective.
    """

    soup_note = "DICE members have independent random inits (no shared basin to average in)"

    def __init__(self, members: Sequence[DiceMember], num_classes: int, latent: int, delta_cr: float, beta: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_members, self.num_classes = len(members), num_classes
        self.delta_cr, self.beta = float(delta_cr), float(beta)
        self.discriminator = nn.Sequential(nn.Linear(2 * latent + num_classes, 64), nn.ReLU(), nn.Linear(64, 1))
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members])

    def _disc(self, z1: Tensor, z2: Tensor, y: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        inp = torch.cat([z1, z2, F.one_hot(y, self.num_classes).to(z1.dtype)], dim=-1)
        out = self.discriminator(inp) if params is None else functional_call(self.discriminator, dict(params), (inp,))
        return out.squeeze(-1)

    def member_objective(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """mean_m VCEB_m and the sampled codes z_m `[B, d]` (reparameterised)."""
        vcebs, codes = [], []
        for m in self.members:
            mu, logvar = m.encode(x)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=self.generator).to(mu)
            vcebs.append(L.vceb(m.classifier(z), y, mu, logvar, m.class_means[y], self.beta))
            codes.append(z)
        return torch.stack(vcebs).mean(), codes

    def training_loss(self, minibatches: Minibatches, step: int, total_steps: int) -> tuple[Tensor, Logs]:
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        base, codes = self.member_objective(x, y)
        i, j = L.random_pair(self.num_members, self.generator)
        perm = L.same_class_permutation(y, self.generator)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        cr = L.cr_member_loss(self._disc(codes[i], codes[j], y, frozen))
        zi, zj = codes[i].detach(), codes[j].detach()
        disc = L.cr_discriminator_loss(self._disc(zi, zj, y), self._disc(zi, zj[perm], y))
        members = base if self.delta_cr == 0 else base + self.delta_cr * cr
        return members + disc, {"loss": _f(members), "vceb": _f(base), "cr": _f(cr), "disc": _f(disc)}

    def soup(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Builders (config → method)
# ----------------------------------------------------------------------------------------------------------------

Builder = Callable[..., nn.Module]
METHODS: Registry[Builder] = Registry("ensemble method")


def _featurizer(cfg: Mapping[str, Any], in_chans: int) -> nn.Module:
    return build_featurizer(str(cfg["backbone"]), in_chans=in_chans, **dict(cfg.get("backbone_kwargs") or {}))


def build_member_ensemble(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
                          diversity: str, frozen_backbone: nn.Module | None = None, seed: int = 0) -> MemberEnsemble:
    """Deep members (M featurizers) or, given `frozen_backbone`, one shared featurizer with M heads.

    Heads share one random init when `head_init: shared` (then the weight soup averages around that init).
    """
    featurizers = [frozen_backbone] if frozen_backbone is not None else [
        _featurizer(cfg, in_chans) for _ in range(num_members)]
    dim = int(featurizers[0].num_features)
    heads = [make_head(dim, num_classes, int(cfg.get("head_layers", 1))) for _ in range(num_members)]
    if cfg.get("head_init", "independent") == "shared":
        for h in heads[1:]:
            h.load_state_dict(heads[0].state_dict())
    return MemberEnsemble(featurizers, heads, diversity, float(cfg.get("lam", 0.0)), cfg, seed)


def _members(diversity: str) -> Builder:
    def build(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
              frozen_backbone: nn.Module | None = None, seed: int = 0) -> nn.Module:
        return build_member_ensemble(cfg, num_classes, in_chans, num_members, diversity, frozen_backbone, seed)

    return build


for _name, _div in [("deep", "none"), ("shallow", "none"), ("sed", "sed"), ("gncl", "gncl"), ("ncl", "ncl"),
                    ("balanced", "balanced"), ("sdde", "sdde"), ("attribution", "attribution"), ("fishr", "fishr")]:
    METHODS.add(_name, _members(_div))


@METHODS.register("packed")
def build_packed(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
                 frozen_backbone: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """Packed digits CNN (`backbone: digits_cnn`) or packed ResNet-18 (`backbone: resnet18`)."""
    kw = dict(alpha=float(cfg.get("alpha", 2)), num_estimators=num_members, gamma=int(cfg.get("gamma", 2)))
    width = int(dict(cfg.get("backbone_kwargs") or {}).get("width", 32))
    if cfg["backbone"] == "digits_cnn":
        net = packed_digits_cnn(num_classes, in_chans, width, **kw)
    elif cfg["backbone"] == "resnet18":
        net = packed_resnet18(num_classes, in_chans, width, small_input=bool(cfg.get("small_input", True)), **kw)
    else:
        raise SoupsError(f"packed backbone must be digits_cnn or resnet18, got {cfg['backbone']!r}")
    return PackedEnsemble(net, num_members)


@METHODS.register("mixmo")
def build_mixmo(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
                frozen_backbone: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """MixMo with the chosen backbone as shared core (its input channels = the encoders' width)."""
    width = int(cfg.get("encoder_width", 16))
    core = _featurizer(cfg, width)
    net = MixMoNet(core, in_chans, width, int(core.num_features), num_classes, num_members)
    return MixMoEnsemble(net, cfg, seed)


@METHODS.register("dice")
def build_dice(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
               frozen_backbone: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """DICE members with a `latent`-dimensional Gaussian bottleneck (64 in the thesis)."""
    latent = int(cfg.get("latent", 64))
    members = [DiceMember(_featurizer(cfg, in_chans), num_classes, latent) for _ in range(num_members)]
    return DiceEnsemble(members, num_classes, latent, float(cfg.get("lam", 0.2)), float(cfg.get("beta", 100.0)),
                        seed)


def build_method(cfg: Mapping[str, Any], num_classes: int, in_chans: int, num_members: int,
                 frozen_backbone: nn.Module | None = None, seed: int = 0) -> nn.Module:
    """The method named `cfg["name"]`.

    Raises:
        UnknownNameError: unknown method (lists the valid ones).
        SoupsError: M < 2, or options that do not fit the method.
    """
    if num_members < 2:
        raise SoupsError(f"an ensemble needs num_members >= 2, got {num_members}")
    return METHODS.get(str(cfg["name"]))(cfg, num_classes, in_chans, num_members, frozen_backbone, seed)
