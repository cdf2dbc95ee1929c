"""Run under torchrun by test_trainer.py: train, and dump each rank's masks after every epoch."""

import sys
from pathlib import Path

import torch

from maxq.train.loop import train
from maxq.train.recipe import TrainConfig

out, dump = sys.argv[1], Path(sys.argv[2])


def save_masks(epoch, record, sparsifier):
    import torch.distributed as dist

    masks = {name: mask.clone() for name, mask in sparsifier.named_masks()}
    torch.save(masks, dump / f"rank{dist.get_rank()}_epoch{epoch}.pt")


cfg = TrainConfig(dataset="synthetic", model="cnn_small", epochs=2, batch_size=32, out=out, progress=False, threads=1)
train(cfg, on_epoch_end=save_masks)
