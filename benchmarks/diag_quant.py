"""Compare the fused Triton activation quantizer with the torch quantizer on the GPU, element by element."""

import torch

from blockfp8.act_quant import quantize_activation_fused
from blockfp8.check import _operands
from blockfp8.quant import quantize_activation


def compare(x, label):
    qt, st = quantize_activation(x)
    qf, sf = quantize_activation_fused(x, layout="row")
    bt, bf = qt.view(torch.uint8), qf.view(torch.uint8)
    bad = (bt != bf).nonzero()
    sbad = (st != sf).nonzero()
    print(f"{label}: {bad.shape[0]} fp8 bytes differ of {bt.numel()}, {sbad.shape[0]} scales differ of {st.numel()}")
    for r, c in sbad[:3].tolist():
        print(f"   scale[{r},{c}] torch={st[r, c].item()!r} fused={sf[r, c].item()!r}")
    for r, c in bad[:6].tolist():
        g = c // 128
        xv = x[r, c].float().item()
        print(f"   q[{r},{c}] x={xv!r} x/s_t={xv / st[r, g].item()!r} torch={qt[r, c].float().item()!r} "
              f"(0x{bt[r, c].item():02x}) fused={qf[r, c].float().item()!r} (0x{bf[r, c].item():02x})")


torch.manual_seed(0)
x = torch.randn(1, 128, device="cuda") * torch.exp(3 * torch.randn(1, 1, device="cuda"))
x[-1, -1] = -0.0
compare(x.bfloat16(), "test case M=1 K=128 bf16")
for m, n, k in [(77, 130, 1024), (1, 1536, 7168), (7, 36864, 7168), (16, 2112, 7168)]:
    xb, _, _ = _operands(m, n, k, torch.device("cuda"), 0)
    compare(xb, f"check operands M={m} K={k}")
a = torch.rand(100000, device="cuda") * 100
print("scalar-divisor division differs from tensor division in",
      (a / 448.0 != a / torch.full_like(a, 448.0)).sum().item(), "of", a.numel())
print("tensor division differs from fp64-rounded division in",
      (a / torch.full_like(a, 448.0) != (a.double() / 448.0).float()).sum().item())
