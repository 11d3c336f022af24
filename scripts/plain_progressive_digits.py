"""Progressive distillation as a plain loop, outside distillkit: the issue's "plain loops tried as a
new user would", run on our own teachers (the benchmark's, and the weaker 800- and 1,600-update
teachers of docs/step_distillation_probes.md), so that loop and distillkit compare at one teacher.

Nothing of distillkit's training code is used. The teacher is the diffusers folder that
``distill-export`` writes (``UNet2DModel`` + ``DDIMScheduler``), the DDIM steps are written out
from the scheduler's ``alphas_cumprod`` on its trailing timesteps, and the loop is Salimans & Ho
(2022), Algorithm 2: for z_t = alpha_t x + sigma_t eps and a student step t -> t'' over two teacher
steps t -> t' -> t'',

    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L = max(alpha_t^2 / sigma_t^2, 1) || x_hat_student(z_t) - x_tilde ||^2

with v-prediction throughout (x_hat = alpha z - sigma v), rounds 64 -> 32 -> ... -> 1, each
round's student starting as (and then replacing) its teacher. Only the scoring is shared with the
benchmark (distillkit's digits-FID on 700 samples from noise seed 0), so the numbers are
comparable with ``benchmarks/step_distill_digits.json``'s.

    distill-export checkpoint=runs/bench_step_distill_digits/digits_diffusion_teacher/default/last.ckpt \\
        out=runs/plain_loop/teacher_seed0
    python scripts/plain_progressive_digits.py --teacher runs/plain_loop/teacher_seed0 --seed 0 \\
        --out benchmarks/step_distill_digits_probe_plain_loop.json                 # Adam 1e-4, constant
    python scripts/plain_progressive_digits.py ... --lr 1e-3 --anneal               # fresh Adam per round,
                                                                                    # lr 1e-3 -> 0 linearly

Resumable by row: a (recipe, seed) already in --out is skipped.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import time
from pathlib import Path

import torch


def ddim_step(ac: torch.Tensor, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step t -> s from a v-prediction; s = -1 is the clean end (alpha = 1)."""
    (a_t, sig_t), (a_s, sig_s) = alpha_sigma(ac, t), alpha_sigma(ac, s)
    x0 = a_t * z - sig_t * v
    eps = sig_t * z + a_t * v
    return a_s * x0 + sig_s * eps


def alpha_sigma(ac: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alpha_t^2), each (B, 1, 1, 1);
    alphas_cumprod[-1] := 1 (set_alpha_to_one)."""
    a = torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones_like(ac[0])).sqrt().view(-1, 1, 1, 1)
    return a, (1 - a ** 2).sqrt()


def plain_target(teacher_fn, ac: torch.Tensor, z: torch.Tensor, t, t1, t2) -> torch.Tensor:
    """Algorithm 2's x_tilde: two teacher DDIM steps t -> t1 -> t2 (v-prediction), as the x0 of one
    DDIM step t -> t2 from z."""
    z1 = ddim_step(ac, teacher_fn(z, t), z, t, t1)
    z2 = ddim_step(ac, teacher_fn(z1, t1), z1, t1, t2)
    (a_t, sig_t), (a_2, sig_2) = alpha_sigma(ac, t), alpha_sigma(ac, t2)
    ratio = sig_2 / sig_t
    return (z2 - ratio * z) / (a_2 - ratio * a_t)


def grid(scheduler, n: int) -> torch.Tensor:
    """The trailing DDIM timesteps for n steps, with the clean end -1 appended."""
    scheduler.set_timesteps(n)
    return torch.cat([scheduler.timesteps.long(), torch.tensor([-1])])


@torch.no_grad()
def sample(unet, scheduler, n_steps: int, num: int = 700) -> torch.Tensor:
    ac = scheduler.alphas_cumprod
    g = grid(scheduler, n_steps)
    z = torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(n_steps):
        t = g[i].expand(num)
        z = ddim_step(ac, unet(z, t).sample, z, t, g[i + 1].expand(num))
    return z.clamp(-1, 1)  # images in the data range, as distillkit's sampler and a uint8 export give them


def distil(teacher, scheduler, data: torch.Tensor, seed: int, lr: float, anneal: bool, updates: int, batch: int,
           log) -> list[dict]:
    """Rounds 64 -> 32 -> ... -> 1 from ``teacher`` on the training images ``data``; after each
    round, its step count, cost so far and 700 samples of its student."""
    torch.manual_seed(seed)
    ac = scheduler.alphas_cumprod.float()
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    rows, n, spent, t0 = [], 64, 0, time.time()
    student = copy.deepcopy(teacher)
    opt = None
    while n > 1:
        g = grid(scheduler, n)
        student.train().requires_grad_(True)
        if opt is None or anneal:
            opt = torch.optim.Adam(student.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / updates) if anneal else None
        perm, pos = torch.randperm(len(data)), 0
        for k in range(updates):
            if pos + batch > len(data):
                perm, pos = torch.randperm(len(data)), 0
            x = data[perm[pos:pos + batch]]
            pos += batch
            j = torch.randint(0, n // 2, (batch,))
            t, t1, t2 = g[2 * j], g[2 * j + 1], g[2 * j + 2]
            a_t, sig_t = alpha_sigma(ac, t)
            z = a_t * x + sig_t * torch.randn_like(x)
            with torch.no_grad():
                x_tilde = plain_target(lambda z_, t_: teacher(z_, t_).sample, ac, z, t, t1, t2)
            x_hat = a_t * z - sig_t * student(z, t).sample
            w = (a_t ** 2 / sig_t ** 2).clamp(min=1.0).flatten()
            loss = (w * ((x_hat - x_tilde) ** 2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            spent += 1
            if k % 250 == 0 or k == updates - 1:
                log(f"seed {seed} round {len(rows) + 1} ({n} -> {n // 2} steps) update {k + 1}/{updates} loss {loss.item():.4g}")
        n //= 2
        student.eval().requires_grad_(False)
        teacher = copy.deepcopy(student)
        rows.append({"steps": n, "updates": spent, "nfe": 3 * spent, "wall_s": round(time.time() - t0, 1),
                     "images": sample(student, scheduler, n)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="a distill-export folder of the digits teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--anneal", action="store_true", help="fresh Adam per round, lr annealed linearly to 0")
    p.add_argument("--updates-per-round", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("benchmarks/step_distill_digits_probe_plain_loop.json"))
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    recipe = f"plain_adam{a.lr:g}" + ("_annealed" if a.anneal else "") + f"_upr{a.updates_per_round}"
    done = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
    if any(r["recipe"] == recipe and r["seed"] == a.seed for r in done["rows"]):
        print(f"{recipe} seed {a.seed}: already in {a.out}")
        return

    from distillkit.data.digits import DigitsDataModule
    from distillkit.metrics.fid import SampleScorer
    from distillkit.metrics.images import split_images
    from distillkit.runs import atomic_write_text

    dm = DigitsDataModule()  # the benchmark's training split: the loop's data and FID's reference
    dm.setup("fit")
    scorer = SampleScorer("digits")
    stats = scorer.reference(split_images(dm, "train"), "digits", "train")
    from diffusers import DDIMScheduler, UNet2DModel

    teacher = UNet2DModel.from_pretrained(a.teacher / "unet").eval()
    sch = DDIMScheduler.from_pretrained(a.teacher / "scheduler")
    rows = [{"recipe": "teacher (plain DDIM)", "seed": a.seed, "steps": k, "updates": 0, "nfe": 0,
             **{m: scorer.score(sample(teacher, sch, k), stats)[m] for m in ("fid", "is")}} for k in (64, 1)]
    print(f"teacher at 64 / 1 steps: FID {rows[0]['fid']:.3f} / {rows[1]['fid']:.3f}", flush=True)
    for r in distil(teacher, sch, dm.train_set.tensors[0], a.seed, a.lr, a.anneal, a.updates_per_round,
                    a.batch_size, lambda m: print(m, flush=True)):
        s = scorer.score(r.pop("images"), stats)
        rows.append({"recipe": recipe, "seed": a.seed, **r, "fid": s["fid"], "is": s["is"]})
        print(f"{recipe} seed {a.seed}: {r['steps']} steps FID {s['fid']:.3f}", flush=True)
    # runs in parallel processes share the file: re-read and write it under a lock
    with open(str(a.out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        atomic_write_text(a.out, json.dumps(merged_rows(a, recipe, rows), indent=1) + "\n")
    print(f"wrote {a.out}")


def merged_rows(a, recipe: str, rows: list[dict]) -> dict:
    """--out's record with this run's rows in place of any earlier ones of its recipe and seed."""
    done = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
    done.update(name="progressive distillation as a plain loop (diffusers UNet2DModel + DDIMScheduler) "
                     "on the benchmark's teacher (a distill-export folder)",
                machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                        f"{torch.get_num_threads()} thread(s) per run",
                date=time.strftime("%Y-%m-%d"))
    done["rows"] = [r for r in done["rows"] if not (r["seed"] == a.seed and r["recipe"] in (recipe, rows[0]["recipe"]))]
    done["rows"] += [{**r, "teacher": str(a.teacher)} for r in rows]
    return done


if __name__ == "__main__":
    main()
