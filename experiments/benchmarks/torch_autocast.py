r"""``torch_unet.py``'s benchmark with bfloat16 autocast (mixed precision).

  python experiments/benchmarks/torch_autocast.py [--channels_last] \
      [torch_unet.py's flags]

Runs ``torch_unet.main()`` inside ``torch.autocast("cpu", torch.bfloat16)``:
convolutions and linear layers compute in bf16 (oneDNN, on AMX/AVX512-BF16
where the CPU has them) with float32 parameters, optimizer state and loss,
PyTorch's standard mixed precision on CPUs. ``--channels_last`` also keeps
the network's parameters and input in channels-last memory order, the
layout oneDNN's fastest CPU convolutions use. Prints the same JSON line.
"""

import argparse
import sys

import torch

import torch_unet


def channels_last(base):
  """``base`` (an ``nn.Module`` class) with channels-last parameters and
  input."""

  class ChannelsLast(base):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.to(memory_format=torch.channels_last)

    def forward(self, x, t):
      return super().forward(x.contiguous(memory_format=torch.channels_last),
                             t)

  return ChannelsLast


def main():
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--channels_last", action="store_true")
  a, rest = p.parse_known_args()
  if a.channels_last:
    torch_unet.UNet = channels_last(torch_unet.UNet)
  sys.argv = [sys.argv[0], *rest]
  with torch.autocast("cpu", dtype=torch.bfloat16):
    torch_unet.main()


if __name__ == "__main__":
  main()
