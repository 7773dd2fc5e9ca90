r"""PyTorch reference of medgen_jax's DDPM U-Net, for speed comparisons only.

Mirrors ``medgen_jax.nn.unet.UNet`` (same layers, widths and parameter count)
and times an ε-prediction AdamW training step and a sampling (forward) step
on the CPU, so both frameworks are measured on the same machine::

  pip install torch==2.13.0
  python experiments/benchmarks/torch_unet.py --ch=64 --num_res_blocks=2 \
      --num_groups=32 --batch=32 --res=32 --steps=10

Prints one JSON line: params, train step seconds (median), sampling step
seconds (median), peak RSS.
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(1e4) * torch.arange(half) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):

  def __init__(self, cin, cout, emb_dim, groups):
    super().__init__()
    self.n1 = nn.GroupNorm(min(groups, cin), cin)
    self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.e = nn.Linear(emb_dim, cout)
    self.n2 = nn.GroupNorm(min(groups, cout), cout)
    self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x, emb):
    h = self.c1(F.silu(self.n1(x)))
    h = h + self.e(F.silu(emb))[:, :, None, None]
    h = self.c2(F.silu(self.n2(h)))
    return self.skip(x) + h


class Attention(nn.Module):

  def __init__(self, ch, heads, groups):
    super().__init__()
    self.heads = heads
    self.norm = nn.GroupNorm(min(groups, ch), ch)
    self.qkv = nn.Linear(ch, 3 * ch)
    self.proj = nn.Linear(ch, ch)

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
    q, k, v = self.qkv(h).reshape(b, -1, 3, self.heads, c // self.heads
                                  ).permute(2, 0, 3, 1, 4)
    h = F.scaled_dot_product_attention(q, k, v)
    h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
    return x + h.transpose(1, 2).reshape(b, c, hh, ww)


class UNet(nn.Module):

  def __init__(self, cin=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
               attn_res=(), heads=4, groups=32, res=32):
    super().__init__()
    emb = 4 * ch
    self.ch = ch
    self.temb = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(),
                              nn.Linear(emb, emb))
    self.inp = nn.Conv2d(cin, ch, 3, padding=1)
    self.down = nn.ModuleList()
    chans, c, side = [ch], ch, res
    for level, m in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        self.down.append(ResBlock(c, ch * m, emb, groups))
        c = ch * m
        if side in attn_res:
          self.down.append(Attention(c, heads, groups))
        chans.append(c)
      if level != len(ch_mult) - 1:
        self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        chans.append(c)
        side //= 2
    self.mid = nn.ModuleList([ResBlock(c, c, emb, groups),
                              Attention(c, heads, groups),
                              ResBlock(c, c, emb, groups)])
    self.up = nn.ModuleList()
    for level, m in reversed(list(enumerate(ch_mult))):
      for _ in range(num_res_blocks + 1):
        self.up.append(ResBlock(c + chans.pop(), ch * m, emb, groups))
        c = ch * m
        if side in attn_res:
          self.up.append(Attention(c, heads, groups))
      if level != 0:
        self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.up.append(nn.Conv2d(c, c, 3, padding=1))
        side *= 2
    self.out_norm = nn.GroupNorm(min(groups, c), c)
    self.out = nn.Conv2d(c, cin, 3, padding=1)

  def forward(self, x, t):
    emb = self.temb(timestep_embedding(t, self.ch))
    h = self.inp(x)
    hs = [h]
    for mod in self.down:
      if isinstance(mod, ResBlock):
        h = mod(h, emb)
        hs.append(h)
      elif isinstance(mod, Attention):
        h = mod(h)
        hs[-1] = h
      else:
        h = mod(h)
        hs.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
    for mod in self.up:
      if isinstance(mod, ResBlock):
        h = mod(torch.cat([h, hs.pop()], dim=1), emb)
      else:
        h = mod(h)
    return self.out(F.silu(self.out_norm(h)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ch", type=int, default=64)
  p.add_argument("--ch_mult", default="1,2,2")
  p.add_argument("--num_res_blocks", type=int, default=2)
  p.add_argument("--num_groups", type=int, default=32)
  p.add_argument("--attn_res", default="")
  p.add_argument("--res", type=int, default=32)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--sample_batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--profile", type=int, default=0,
                 help="also time N train steps per aten op (torch.profiler)")
  a = p.parse_args()
  if a.threads:
    torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  net = UNet(ch=a.ch, ch_mult=tuple(int(x) for x in a.ch_mult.split(",")),
             num_res_blocks=a.num_res_blocks, groups=a.num_groups,
             attn_res=tuple(int(x) for x in a.attn_res.split(",") if x),
             res=a.res)
  opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.0)
  abar = torch.cos((torch.arange(1000) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  x0 = torch.randn(a.batch, 1, a.res, a.res)

  def train_step():
    t = torch.randint(0, 1000, (a.batch,))
    noise = torch.randn_like(x0)
    ab = abar[t][:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    loss = F.mse_loss(net(xt, t), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()

  xs = torch.randn(a.sample_batch, 1, a.res, a.res)

  @torch.no_grad()
  def sample_step():
    net(xs, torch.full((a.sample_batch,), 500))

  def timed(fn, n):
    fn()
    out = []
    for _ in range(n):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
    return statistics.median(out)

  res = {"framework": f"torch {torch.__version__}",
         "threads": torch.get_num_threads(),
         "params_M": sum(q.numel() for q in net.parameters()) / 1e6,
         "train_step_s": timed(train_step, a.steps),
         "sample_step_s": timed(sample_step, max(2, a.steps // 2)),
         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  if a.profile:
    res["profile_ms"] = profile_ms(train_step, a.profile)
  print(json.dumps(res), flush=True)


# aten ops -> the categories of medgen_jax.profiling (self CPU time).
CATEGORIES = (
    ("conv forward", ("aten::mkldnn_convolution",)),
    ("conv input+kernel grad", ("aten::convolution_backward",)),
    ("group norm + silu fwd", ("aten::native_group_norm", "aten::silu")),
    ("group norm + silu bwd", ("aten::native_group_norm_backward",
                               "aten::silu_backward")),
    ("attention", ("aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                   "aten::bmm")),
    ("dense (embedding)", ("aten::addmm", "aten::mm")),
    ("copies/cat", ("aten::copy_", "aten::cat", "aten::clone",
                    "aten::contiguous")),
)


def profile_ms(step, steps: int) -> dict:
  """Self CPU milliseconds per train step by category; the rest of the
  ops (elementwise, optimizer, allocation) is "other"."""
  from torch.profiler import profile  # pylint: disable=import-outside-toplevel
  with profile() as prof:
    for _ in range(steps):
      step()
  out = {name: 0.0 for name, _ in CATEGORIES}
  out["other"] = 0.0
  for ev in prof.key_averages():
    cat = next((c for c, ops in CATEGORIES if ev.key in ops), "other")
    out[cat] += ev.self_cpu_time_total / 1e3 / steps
  out["total (profiled)"] = sum(out.values())
  return out


if __name__ == "__main__":
  main()
