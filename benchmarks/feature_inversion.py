"""What the server can learn from uploaded features: image reconstruction vs privacy noise.

``python benchmarks/feature_inversion.py [--noise 0,0.01,0.04,0.16,1 --clip 25]``

A white-box attacker: it knows the edge extractor ``f_e`` (the EcoFed case, a
public pre-trained extractor; or a colluding node) and has public images. It
computes features of its public images through the same privacy mechanism
(clip to ``--clip``, Gaussian noise ``noise x clip``, :mod:`flwr_gkt.core.privacy`)
and fits a decoder from features to pixels: ridge regression in its dual form
(linear kernel). It then reconstructs held-out "victim" images from their
privatized features and is scored by

* PSNR of the reconstruction (pixels in [0, 1]; a blank mean image scores
  the ``baseline`` PSNR), and
* re-identification: the share of victims whose reconstruction is closest (MSE)
  to their own image among ``--candidates`` victim images (chance: 1/candidates).

The extractor is ResNet-8 pre-trained for one epoch on images no victim or
attacker image comes from (``flwr_gkt.data.pretrain``), or ``--pretrained PATH``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr_gkt.core.edge import extract
from flwr_gkt.core.models import load_pretrained
from flwr_gkt.core.privacy import privatize
from flwr_gkt.core.registry import build_edge_model
from flwr_gkt.data import load_dataset, normalize
from flwr_gkt.data.pretrain import pretrain_edge


def ridge_dual(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Dual ridge coefficients ``A`` with ``y_hat(x') = x' x^T A``."""
    gram = (x @ x.T).double()
    gram += lam * gram.diagonal().mean() * torch.eye(len(x), dtype=torch.float64)
    return torch.linalg.solve(gram, y.double()).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--noise", default="0,0.01,0.04,0.16,1")
    parser.add_argument("--clip", type=float, default=25.0)
    parser.add_argument("--public", type=int, default=2000, help="attacker's public images")
    parser.add_argument("--victims", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    raw = load_dataset("fashion-mnist", "")
    perm = torch.randperm(len(raw.y_test), generator=torch.Generator().manual_seed(args.seed))
    pub, vic = perm[: args.public], perm[args.public : args.public + args.victims]
    pixels = raw.x_test.float() / 255.0 if raw.x_test.dtype == torch.uint8 else raw.x_test.float()
    x_all = normalize(raw.x_test, raw.info)
    model = build_edge_model("resnet8", raw.info.num_classes, raw.info.channels)
    if args.pretrained:
        load_pretrained(model, args.pretrained, "all")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            info = pretrain_edge(
                Path(tmp) / "edge.pt",
                samples=5000,
                epochs=1,
                fraction=0.1,
                seed=args.seed,
                device="cpu",
            )
            load_pretrained(model, Path(tmp) / "edge.pt", "all")
        print(
            f"extractor: ResNet-8 pre-trained on 5,000 training images, test accuracy "
            f"{info['test-accuracy']:.4f}"
        )
    dev = torch.device("cpu")
    f_pub, _ = extract(model, x_all[pub], 256, dev)
    f_vic, _ = extract(model, x_all[vic], 256, dev)
    y_pub, y_vic = pixels[pub].flatten(1), pixels[vic].flatten(1)
    norms = f_pub.flatten(1).norm(dim=1)
    print(
        f"feature maps {list(f_pub.shape[1:])} ({f_pub[0].numel()} values, the image has {y_pub.shape[1]}); "
        f"per-sample L2 norm median {norms.median():.1f}, clip {args.clip:g}"
    )
    mean_img = y_pub.mean(dim=0, keepdim=True).expand_as(y_vic)
    print(
        f"baseline (mean public image): PSNR {psnr(mean_img, y_vic):.2f} dB, "
        f"re-identification {1 / args.candidates:.1%} (chance)\n"
    )
    print("| privacy-noise | noise-to-clip norm ratio | PSNR dB | re-identification |")
    print("|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed + 1)
    for sigma in [float(s) for s in args.noise.split(",")]:
        a = privatize(f_pub, args.clip, sigma, gen).flatten(1)
        b = privatize(f_vic, args.clip, sigma, gen).flatten(1)
        split = int(0.8 * len(a))
        best = None
        for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0):  # validation on the attacker's own data
            coef = ridge_dual(a[:split], y_pub[:split], lam)
            score = psnr((a[split:] @ a[:split].T @ coef).clamp(0, 1), y_pub[split:])
            if best is None or score > best[0]:
                best = (score, lam)
        coef = ridge_dual(a, y_pub, best[1])
        recon = (b @ a.T @ coef).clamp(0, 1)
        cand = y_vic[: args.candidates]
        dist = torch.cdist(recon[: args.candidates], cand)
        reid = float((dist.argmin(dim=1) == torch.arange(len(cand))).float().mean())
        ratio = sigma * (f_pub[0].numel() ** 0.5)
        print(f"| {sigma:g} | {ratio:.2f} | {psnr(recon, y_vic):.2f} | {reid:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
