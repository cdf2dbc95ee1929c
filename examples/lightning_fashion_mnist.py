"""Train a 2:4 sparse CNN on Fashion-MNIST with PyTorch Lightning and maxq's MaxQCallback.

The LightningModule below is ordinary Lightning code; maxq enters through one callback,
``MaxQCallback(maxq.MaxQConfig(n=2, m=4, ramp=(0, epochs / 2), per_step=True))``: MaxQ's soft masks with a
per-step sparsity ramp over the first half of training, the SR-STE decay on the true gradients, masks updated
after every optimizer step, the sparsifier's state inside Lightning's checkpoints (``--resume``), and at the end
the masks folded into plain weights and checked to be exactly 2:4. The script then saves the folded model with
``torch.save(model.state_dict())``, loads it into a fresh, unsparsified network, checks 2:4 again and reports
test accuracy.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``, files in
/usr/share/datasets/fashion-mnist) or ``--data-dir``. Needs ``pip install maxq[lightning]``.

Examples::

    python examples/lightning_fashion_mnist.py                       # ~1-2 min on 2 CPU cores
    python examples/lightning_fashion_mnist.py --quick               # a few dozen steps (the test suite)
    python examples/lightning_fashion_mnist.py --devices 2 --strategy ddp   # 2 CPU processes (gloo)
    python examples/lightning_fashion_mnist.py --resume lightning_fmnist_2of4/checkpoints/last.ckpt

Under DDP every rank holds the same masks and weights (``--dump DIR`` writes each rank's to ``DIR/rank<r>.pt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import maxq
from maxq.integrations.lightning import MaxQCallback
from maxq.train.data import DatasetMissing, load_dataset, normalize
from maxq.train.models import build_model


class Classifier(L.LightningModule):
    """An ordinary LightningModule: a small CNN (maxq.train.models ``cnn_small``), SGD with a cosine schedule."""

    def __init__(self, info, lr: float, epochs: int) -> None:
        super().__init__()
        self.info, self.lr, self.epochs = info, lr, epochs
        self.model = build_model("cnn_small", info.channels, info.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.info))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)]


@torch.no_grad()
def accuracy(model: nn.Module, info, data, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch):
        correct += int((model(normalize(x, info)).argmax(1) == y).sum())
    return correct / len(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (the ramp spans the first half)")
    parser.add_argument("--train-size", type=int, default=6000, help="training images used (of 60000)")
    parser.add_argument("--test-size", type=int, default=10000, help="test images evaluated (of 10000)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--quick", action="store_true", help="a few dozen steps on a small subset (tests)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (gloo on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores/devices)")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default="lightning_fmnist_2of4", help="output folder (checkpoints, model)")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from (Lightning's ckpt_path)")
    parser.add_argument("--dump", default=None, help="write every rank's masks and weights to DIR/rank<r>.pt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.test_size, args.batch_size = 2, 768, 500, 64
    return args


class DumpMasks(L.Callback):
    """Keeps each rank's masks as they are at the end of training (listed before MaxQCallback, which folds)."""

    def __init__(self, maxq_callback: MaxQCallback) -> None:
        self.maxq_callback, self.masks = maxq_callback, {}

    def on_train_end(self, trainer, pl_module):
        self.masks = {n: m.clone() for n, m in self.maxq_callback.sparsifier.named_masks()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // args.devices))
    L.seed_everything(args.seed, verbose=False)
    try:
        splits = load_dataset("fashion-mnist", args.data_dir, subset=args.train_size)
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test = torch.utils.data.Subset(splits.test, range(min(args.test_size, len(splits.test))))
    loader = torch.utils.data.DataLoader(splits.train, batch_size=args.batch_size, shuffle=True)

    module = Classifier(splits.info, args.lr, args.epochs)
    config = maxq.MaxQConfig(n=2, m=4, ramp=(0, args.epochs / 2), per_step=True)
    sparse = MaxQCallback(config, module="model")
    dump = DumpMasks(sparse)
    out = Path(args.out)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[dump, sparse, ModelCheckpoint(out / "checkpoints", save_last=True)],
        logger=L.loggers.CSVLogger(out, name="logs"),
        enable_progress_bar=not args.quick,
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=True,
    )
    start = time.time()
    trainer.fit(module, loader, ckpt_path=args.resume)  # sparsify, ramp, decay, masks; fold + check at the end

    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
        # Parameters: identical on every rank. (BatchNorm running statistics are each rank's own after the last
        # forward, as in any DDP run on CPU: DDP hands rank 0's buffers to every rank when a forward starts.)
        weights = {k: v.detach().clone() for k, v in module.model.named_parameters()}
        torch.save({"masks": dump.masks, "weights": weights}, Path(args.dump) / f"rank{trainer.global_rank}.pt")
    if trainer.global_rank != 0:
        return 0
    # The folded model is an ordinary one: save it, load it into a fresh network (no maxq), check it again.
    torch.save(module.model.state_dict(), out / "model.pt")
    fresh = build_model("cnn_small", splits.info.channels, splits.info.classes)
    fresh.load_state_dict(torch.load(out / "model.pt"))
    check = maxq.check_nm(fresh, 2, 4, list(dump.masks))  # the layers the callback sparsified
    print(check)
    acc = accuracy(fresh, splits.info, test)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("maxq/")}
    print(f"trained in {time.time() - start:.0f} s; {metrics}")
    print(f"2:4 model: {out / 'model.pt'}, test top-1 {acc:.4f} on {len(test)} images")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
