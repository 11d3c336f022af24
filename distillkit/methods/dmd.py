"""Distribution matching distillation: DMD (Yin et al., "One-step Diffusion with Distribution
Matching Distillation", CVPR 2024) and DMD2 (Yin et al., "Improved Distribution Matching
Distillation for Fast Image Synthesis", NeurIPS 2024; code: tianweiy/DMD2).

Roles (:mod:`distillkit.methods.roles`): the ``generator`` (the student, starting as the teacher)
and the ``critic``: the fake-score network (a copy of the student, trained online to denoise the
generator's samples) with DMD2's GAN head. The real score is the frozen teacher.

The generator G maps noise to a sample in ``timesteps`` steps (``[T-1]``: one step). Step i takes
its input x_{t_i} (pure noise z at i = 0) to the x0-prediction of the student denoiser at t_i; a
multi-step generator re-noises that prediction to t_{i+1} (:func:`distillkit.diffusion.multistep_sample`).

Distribution matching (DMD eq. 7; DMD2's ``compute_distribution_matching_loss``). For a generator
sample x, t ~ U{floor(dm_t_min T), ..., floor(dm_t_max T)}, x_t = alpha_t x + sigma_t eps:

    x0_real = teacher's x0-prediction at (x_t, t) with guidance ``real_guidance``
    x0_fake = fake score's x0-prediction at (x_t, t), unguided
    grad    = ((x - x0_real) - (x - x0_fake)) / mean_dims |x - x0_real|
    L_DM    = 0.5 mse(x, stopgrad(x - grad))          (so dL/dx = grad / numel)

both x0 in float32. The fake score is trained with the denoising loss (``loss_space``,
``weighting``) on detached generator samples, as the teacher was.

DMD's regression loss (eq. 8): L_reg = || G(z) - y ||^2 over the teacher's ODE pairs (z, y), written
once by ``distill-pairs`` (DMD uses LPIPS, whose weights cannot be loaded offline; the mean
squared error here), weight ``regression_weight``.

DMD2 (Sec. 4): no regression loss; ``critic_updates_per_generator_update`` critic updates per
generator update (two time-scale rule); a GAN classifier D = head(bottleneck features of the fake
score at a noised input) with the non-saturating losses

    critic:     gan_critic_weight    * [softplus(D(x_t fake)) + softplus(-D(x_t real))]
    generator:  gan_generator_weight * softplus(-D(x_t fake))

where fake and real are noised at t ~ U{0, ..., gan_max_timestep - 1} (diffusion GAN); and, for a
multi-step generator, backward simulation: each generator update picks one step i and its input
is the generator's own (no-grad) sample of steps 0..i-1 re-noised to t_i (``generator_inputs=real``:
real data noised to t_i instead).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.diffusion import multistep_sample, to_x0
from distillkit.diffusion.from_config import plain
from distillkit.errors import DistillError
from distillkit.methods.diffusion import DiffusionMethod, mean_flat
from distillkit.methods.ema import copy_sharing_frozen
from distillkit.methods.roles import MultiRoleMethod
from distillkit.models.denoiser import Cond, Guidance, map_cond
from distillkit.models.lora import has_lora

GENERATOR_INPUTS = ("backward", "real")


# --------------------------------------------------------------------------- the maths
def distribution_matching_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient of the generator sample x (DMD2's code): ((x - x0_real) - (x - x0_fake)),
    normalised per sample by mean |x - x0_real| over its dimensions. Non-finite entries (a sample
    with x = x0_real exactly) become 0; DMD2's ``torch.nan_to_num`` would make them +-3.4e38."""
    p_real, p_fake = x - x0_real, x - x0_fake
    dims = list(range(1, x.ndim))
    return torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mse(x, stopgrad(x - grad)): a loss whose gradient in x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach(), reduction="mean")


def gan_critic_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator (DMD2 eq. 3): softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(d_fake).mean() + F.softplus(-d_real).mean()


def gan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator: softplus(-D(fake))."""
    return F.softplus(-d_fake).mean()


def host_randint(n: int, host: torch.Generator) -> int:
    """``torch.randint(0, n, ())`` from the CPU generator ``host``, as a Python int: read from a CPU
    tensor, so no device is waited for (tests/host_reads.py leaves this read out)."""
    return int(torch.randint(0, n, (), generator=host))


def to_device_async(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``. To a GPU through pinned memory without blocking: a copy from
    pageable memory would wait for all the work queued on the GPU."""
    if torch.device(device).type == "cuda":
        return v.pin_memory().to(device, non_blocking=True)
    return v.to(device)


class GANHead(nn.Module):
    """DMD2's classifier branch on the fake score's bottleneck: for (B, C, h, w) features a strided
    4x4 convolution, GroupNorm, SiLU, global average pooling and a linear map to one logit (DMD2's
    SD head: two strided convolutions down to 1x1, GroupNorm, SiLU, a 1x1 convolution; pooling here
    makes it independent of the resolution); for (B, C) features (an MLP) Linear, SiLU, Linear."""

    def __init__(self, channels: int, spatial: bool = True):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(math.gcd(32, channels), channels),
                                     nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # a new tensor, not squeeze's view: FSDP2 warns of a unit (the head is one) that returns a view
        return self.net(features.float()).squeeze(-1).clone()


# --------------------------------------------------------------------------- the method
class DMD(MultiRoleMethod, DiffusionMethod):
    """DMD (see the module docstring); :class:`DMD2` sets DMD2's defaults."""

    method_name = "dmd"
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, real_guidance: float = 1.0,
                 timesteps: Optional[list[int]] = None, dm_weight: float = 1.0, dm_t_min: float = 0.02,
                 dm_t_max: float = 0.98, regression_weight: float = 0.25, pairs: Optional[str] = None,
                 regression_batch_size: Optional[int] = None, critic_updates_per_generator_update: int = 1,
                 gan_generator_weight: float = 0.0, gan_critic_weight: float = 0.0,
                 gan_max_timestep: Optional[int] = None, generator_inputs: str = "backward",
                 init_from_teacher: bool = True, prediction_type: Optional[str] = None, **kw: Any):
        if prediction_type is None and teacher is not None:  # the teacher's own, as the generator starts as it
            prediction_type = getattr(teacher, "prediction_type", None)
        kw.pop("cond_dropout", None)
        super().__init__(student, teacher=teacher, prediction_type=prediction_type, cond_dropout=0.0, **kw)
        if self.is_edm:
            raise DistillError(f"method={self.method_name} runs on a VP schedule's timesteps (DMD2 uses the teacher's "
                               "1000): use a VP schedule (e.g. schedule=cosine or the teacher folder's own)")
        T = self.schedule.num_train_timesteps
        self.check_config(dict(timesteps=timesteps, dm_weight=dm_weight, dm_t_min=dm_t_min, dm_t_max=dm_t_max,
                               regression_weight=regression_weight, gan_generator_weight=gan_generator_weight,
                               gan_critic_weight=gan_critic_weight, gan_max_timestep=gan_max_timestep,
                               critic_updates_per_generator_update=critic_updates_per_generator_update,
                               generator_inputs=generator_inputs), num_train_timesteps=T)
        self.timesteps = [T - 1] if timesteps is None else [int(t) for t in timesteps]
        self.num_steps = len(self.timesteps)  # distill-sample's default: the generator's own steps
        self.real_guidance = float(real_guidance)
        self.dm_weight = float(dm_weight)
        self.dm_t_range = (int(dm_t_min * T), min(int(dm_t_max * T), T - 1))
        self.critic_updates_per_generator_update = int(critic_updates_per_generator_update)
        self.gan_generator_weight, self.gan_critic_weight = float(gan_generator_weight), float(gan_critic_weight)
        self.gan_max_timestep = T if gan_max_timestep is None else int(gan_max_timestep)
        self.generator_inputs = str(plain(generator_inputs))
        self.regression_weight = float(regression_weight)
        self.regression_batch_size = regression_batch_size
        self.pairs = None
        # teacher None: rebuilt from a checkpoint to sample or export (models.loading), not to train
        training = self.teacher is not None
        if self.regression_weight > 0 and training:
            if not pairs:
                raise DistillError(f"method={self.method_name}: method.regression_weight={regression_weight} needs the "
                                   "teacher's noise-image pairs: write them once with distill-pairs checkpoint=<teacher's "
                                   "last.ckpt> num_pairs=<N> out=pairs.safetensors and set method.pairs=pairs.safetensors "
                                   "(or method.regression_weight=0)")
            from distillkit.pairs import load_pairs

            self.pairs = load_pairs(pairs, key="method.pairs")
            self.pairs.check_shape(tuple(self.image_shape), "method.pairs")
        lora = has_lora(self.student)
        if training:
            self.start_from_teacher(init_from_teacher, lora)
        # the critic: the fake score (starting as the generator, i.e. the teacher) and the GAN head
        self.fake_score = copy_sharing_frozen(self.student)
        self.gan_head = GANHead(self.fake_score.bottleneck_channels, spatial=len(self.image_shape) == 3) \
            if self.gan_generator_weight > 0 or self.gan_critic_weight > 0 else None

    @classmethod
    def check_config(cls, cfg: dict, num_train_timesteps: Optional[int] = None,
                     dataset_gives_images: Optional[bool] = None) -> None:
        """The method's values (``method.*``, the keys of ``__init__``) that can be judged before any network
        or data loads (the CLI calls this first: loading SDXL takes minutes); the bounds that need the
        schedule's T when it is known, and the GAN's need of real images when the dataset is."""
        T = num_train_timesteps
        timesteps = cfg.get("timesteps")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if not ts:
                raise DistillError("method.timesteps=[]: give the generator's conditioning timesteps, e.g. [999] "
                                   "(one step) or [999, 749, 499, 249], or null for [T-1]")
            if any(t < 0 or (T is not None and t >= T) for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                within = f"within [0, {T - 1}] (the schedule's {T} training timesteps)" if T else "from at most T - 1 to 0"
                raise DistillError(f"method.timesteps={ts}: must descend strictly {within}")
        lo, hi = cfg.get("dm_t_min", 0.02), cfg.get("dm_t_max", 0.98)
        if not 0 <= lo < hi <= 1:
            raise DistillError(f"method.dm_t_min={lo}, method.dm_t_max={hi}: need 0 <= dm_t_min < dm_t_max <= 1")
        ratio = cfg.get("critic_updates_per_generator_update", 1)
        if int(ratio) < 1:
            raise DistillError(f"method.critic_updates_per_generator_update={ratio}: must be at least 1 (DMD2: 5)")
        for key in ("gan_generator_weight", "gan_critic_weight", "regression_weight", "dm_weight"):
            if float(cfg.get(key) or 0) < 0:
                raise DistillError(f"method.{key}={cfg[key]}: must be at least 0")
        gan_max = cfg.get("gan_max_timestep")
        if gan_max is not None and not (1 <= int(gan_max) and (T is None or int(gan_max) <= T)):
            raise DistillError(f"method.gan_max_timestep={gan_max}: must lie in [1, {T or 'T'}]")
        inputs = str(plain(cfg.get("generator_inputs", "backward")))
        if inputs not in GENERATOR_INPUTS:
            raise DistillError(f"method.generator_inputs={inputs!r}: allowed values are {', '.join(GENERATOR_INPUTS)}")
        gan = float(cfg.get("gan_generator_weight") or 0) > 0 or float(cfg.get("gan_critic_weight") or 0) > 0
        if dataset_gives_images is False and (gan or (inputs == "real" and len(timesteps or [0]) > 1)):
            what, off = (("the GAN (method.gan_*_weight)", "method.gan_generator_weight=0 method.gan_critic_weight=0")
                         if gan else ("method.generator_inputs=real", "method.generator_inputs=backward"))
            raise DistillError(f"method={cls.method_name}: {what} needs real data and the dataset gives prompts only; use "
                               "a dataset with images (dataset=image_text_folder, or coco_captions with "
                               f"dataset.image_dir), or set {off}")

    def use_sampling_times(self, ts: list) -> None:
        """Sample ``len(ts)`` steps at ``ts`` (``distill-sample timesteps=``), checked as
        ``method.timesteps`` is: the generator's steps at other conditioning timesteps."""
        self.check_config({"timesteps": ts}, num_train_timesteps=self.schedule.num_train_timesteps)
        self.timesteps = [int(t) for t in ts]
        self.num_steps = len(self.timesteps)

    # ------------------------------------------------------------------ roles
    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        critic = [p for p in self.fake_score.parameters() if p.requires_grad]
        if self.gan_head is not None:
            critic += list(self.gan_head.parameters())
        return {"generator": [p for p in self.student.parameters() if p.requires_grad], "critic": critic}

    # ------------------------------------------------------------------ pieces
    def _t(self, n: int, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
        """n timesteps uniform in {lo, ..., hi}, drawn from g, on this device."""
        return torch.randint(lo, hi + 1, (n,), generator=g, device=g.device).to(self.device)

    def x0_of(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: Guidance = None,
              pred_type: Optional[str] = None, role: Optional[str] = None) -> torch.Tensor:
        """The denoiser's x0-prediction at (x_t, t) in float32; with ``role``, through that role's
        torch.compile wrapper when ``trainer.compile`` is set (:meth:`compiled`)."""
        call = self.compiled(role, net) if role else net
        out = net.guided(x_t, t, cond, guidance, forward=call) if guidance is not None else call(x_t, t, cond)
        x_t = x_t.float()
        return to_x0(out.float(), pred_type or self.prediction_type, x_t,
                     self.schedule.alpha(t, like=x_t), self.schedule.sigma(t, like=x_t))

    def generator_step(self, net: nn.Module, x_in: torch.Tensor, i: int, cond: Cond) -> torch.Tensor:
        """Step i of the generator: its x0 from input x_in at timestep ``timesteps[i]``."""
        t = torch.full((x_in.shape[0],), self.timesteps[i], device=x_in.device, dtype=torch.long)
        return self.x0_of(net, x_in, t, cond)

    def generator_input(self, z: torch.Tensor, i: int, cond: Cond, x_real: Optional[torch.Tensor],
                        g: torch.Generator) -> torch.Tensor:
        """The generator's input at step i: z at step 0; later, its own no-grad sample of steps
        0..i-1 re-noised to t_i (backward simulation), or real data noised to t_i."""
        if i == 0:
            return z
        if self.generator_inputs == "real":
            if x_real is None:
                raise DistillError("method.generator_inputs=real noises real data: the dataset gives none")
            return self.schedule.add_noise(x_real.float(), z, self.timesteps[i])
        with torch.no_grad():
            x0 = multistep_sample(lambda x, t: self.student(x, t, cond).float(), z, self.schedule, self.timesteps[:i],
                                  generator=g, pred_type=self.prediction_type)
            return self.schedule.add_noise(x0, self.randn(z.shape, g), self.timesteps[i])

    def generator_step_index(self, g: torch.Generator, host: torch.Generator) -> int:
        """The generator step i this update trains, uniform over ``timesteps`` (0 for one step).
        Backward simulation runs i steps, so the host needs i; drawn on ``g``'s device, it would have
        to be read back (on a GPU: wait for all queued work) at every update. So ``g`` draws it and
        moves on as before, and i is read from ``host``, the update's CPU generator seeded as ``g``,
        whose first draw this is: on a CPU ``g``'s own draw, bit for bit; on a GPU a draw of the same
        distribution (CUDA's generator is not the CPU's), equally a function of the update, so
        resumed runs agree."""
        n = len(self.timesteps)
        if n == 1:
            return 0
        torch.randint(0, n, (), generator=g, device=g.device)
        return host_randint(n, host)

    def discriminate(self, x: torch.Tensor, cond: Cond, g: torch.Generator) -> torch.Tensor:
        """D(x): the GAN head on the fake score's bottleneck at x noised to t ~ U{0, ..., gan_max_timestep - 1}."""
        t = self._t(x.shape[0], 0, self.gan_max_timestep - 1, g)
        x_t = self.schedule.add_noise(x.float(), self.randn(x.shape, g), t)
        return self.gan_head(self.fake_score.bottleneck(x_t, t, cond))

    def dm_loss(self, x: torch.Tensor, cond: Cond, g: torch.Generator) -> torch.Tensor:
        """DMD's distribution-matching loss of generator samples x (see the module docstring)."""
        t = self._t(x.shape[0], *self.dm_t_range, g)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach().float(), self.randn(x.shape, g), t)
            x0_real = self.x0_of(self.teacher, x_t, t, cond, self.real_guidance, self.teacher.prediction_type,
                                 role="teacher")
            x0_fake = self.x0_of(self.fake_score, x_t, t, cond, role="fake_score")
            grad = distribution_matching_grad(x.detach().float(), x0_real, x0_fake)
        return distribution_matching_loss(x, grad)

    def regression_loss(self, n: int, g: torch.Generator, host: torch.Generator) -> torch.Tensor:
        """|| G(z) - y ||^2 over n of the teacher's pairs (z, y) (the generator's first step). The
        pairs stay in host memory, so their indices are needed there: ``g`` draws them (its later
        noise as before), and on a GPU they come from ``host`` instead (reading g's would wait for
        all queued work); the batch goes to the GPU through pinned memory (:func:`to_device_async`).
        On a CPU the indices are ``g``'s, bit for bit."""
        assert self.pairs is not None
        idx = torch.randint(0, len(self.pairs.noise), (n,), generator=g, device=g.device)
        if idx.device.type != "cpu":
            idx = torch.randint(0, len(self.pairs.noise), (n,), generator=host)
        z, y, cond = self.pairs.batch(idx)
        cond = map_cond(cond, lambda v: to_device_async(v, self.device))
        x = self.generator_step(self.train_student, to_device_async(z, self.device), 0, cond)
        return mean_flat((x - to_device_async(y, self.device).float()) ** 2).mean()

    # ------------------------------------------------------------------ one batch
    def training_step(self, batch: Any, batch_idx: int) -> None:
        x_real, cond = self.student.split_batch(batch)
        cond = map_cond(cond, lambda v: v.to(self.device))
        if x_real is not None:
            x_real = x_real.to(self.device)
        B = len(x_real) if x_real is not None else int(next(iter(cond.values())).shape[0])
        if x_real is None and (self.gan_critic_weight > 0 or self.gan_generator_weight > 0):
            raise DistillError(f"method={self.method_name}: the GAN (method.gan_*_weight) needs real data and the dataset "
                               "gives prompts only; use a dataset with images (dataset=image_text_folder, or "
                               "coco_captions with dataset.image_dir), or set method.gan_generator_weight=0 "
                               "method.gan_critic_weight=0")
        g = self.noise_generator(self.updates_of("critic"))
        generator_turn = self.updates_of("critic") % self.critic_updates_per_generator_update == 0
        host = torch.Generator().manual_seed(g.initial_seed())  # the draws the host reads (CPU: as g's)
        i = self.generator_step_index(g, host)
        nfe = 1 + (i if self.generator_inputs == "backward" else 0)
        logs: dict[str, torch.Tensor] = {}

        # the generator's turn (DMD2 makes the samples every batch; it updates every K-th)
        with self.updating("generator") as step:
            z = self.randn((B, *self.image_shape), g)
            x_in = self.generator_input(z, i, cond, x_real, g)
            with torch.set_grad_enabled(generator_turn):
                x_fake = self.generator_step(self.train_student, x_in, i, cond)
            if generator_turn:
                loss = self.dm_weight * self.dm_loss(x_fake, cond, g)
                logs["train/dm_loss"] = loss.detach()
                nfe += 2
                if self.gan_generator_weight > 0:
                    gan = gan_generator_loss(self.discriminate(x_fake, cond, g))
                    logs["train/gan_generator_loss"] = gan.detach()
                    loss = loss + self.gan_generator_weight * gan
                    nfe += 1
                if self.regression_weight > 0:
                    reg = self.regression_loss(int(self.regression_batch_size or B), g, host)
                    logs["train/regression_loss"] = reg.detach()
                    loss = loss + self.regression_weight * reg
                    nfe += 1
                step(loss)
                logs["train/loss"] = loss.detach()

        # the critic's turn: the fake score learns the generator's current samples
        with self.updating("critic") as step:
            x = x_fake.detach()
            loss = self.denoising_loss(self.compiled("fake_score", self.fake_score), x, generator=g, cond=cond).mean()
            logs["train/fake_score_loss"] = loss.detach()
            nfe += 1
            if self.gan_critic_weight > 0:
                gan = gan_critic_loss(self.discriminate(x, cond, g), self.discriminate(x_real, cond, g))
                logs["train/gan_critic_loss"] = gan.detach()
                loss = loss + self.gan_critic_weight * gan
                nfe += 2
            step(loss)

        self.count_nfe(nfe)
        # Lightning's logging step counts batches under manual optimization: this column counts updates
        self.log_scalar("generator_updates", self.global_step)
        for k, v in logs.items():
            self.log(k, v, prog_bar=k in ("train/loss", "train/fake_score_loss"), on_step=True, on_epoch=False, batch_size=B)

    # ------------------------------------------------------------------ evaluation
    def evaluated_denoiser(self) -> tuple[str, nn.Module]:
        """The fake score's denoising loss on held-out real data (the generator is no denoiser)."""
        return "fake_score_loss", self.fake_score

    # ------------------------------------------------------------------ sampling
    def sampling_timesteps(self, num_steps: int) -> list[int]:
        """The generator's own ``timesteps`` for their count, else the trailing grid of ``num_steps``."""
        if num_steps == len(self.timesteps):
            return list(self.timesteps)
        return self.schedule.timesteps(num_steps, "trailing").tolist()

    def run_sampler(self, net: nn.Module, z: torch.Tensor, num_steps: int, spacing: Optional[str],
                    generator: Optional[torch.Generator], cond: Cond, guidance: Guidance) -> torch.Tensor:
        """The generator's samples from noise z: :func:`~distillkit.diffusion.multistep_sample` over
        :meth:`sampling_timesteps` (``spacing`` is not used: the generator's steps are its own)."""
        return multistep_sample(net.model_fn(cond, guidance), z, self.schedule, self.sampling_timesteps(num_steps),
                                generator=generator, pred_type=self.prediction_type)


class DMD2(DMD):
    """DMD2: DMD's defaults changed to the paper's (no regression, TTUR 5, GAN 1e-3 / 1e-2)."""

    method_name = "dmd2"

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, regression_weight: float = 0.0,
                 critic_updates_per_generator_update: int = 5, gan_generator_weight: float = 1e-3,
                 gan_critic_weight: float = 1e-2, **kw: Any):
        super().__init__(student, teacher, regression_weight=regression_weight,
                         critic_updates_per_generator_update=critic_updates_per_generator_update,
                         gan_generator_weight=gan_generator_weight, gan_critic_weight=gan_critic_weight, **kw)


__all__ = ["DMD", "DMD2", "GANHead", "distribution_matching_grad", "distribution_matching_loss",
           "gan_critic_loss", "gan_generator_loss", "copy_sharing_frozen"]
