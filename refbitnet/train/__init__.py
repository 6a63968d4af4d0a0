"""A mini trainer for BitNet b1.58 with every gradient written by hand (NumPy, no autograd).

ops.py       each op's forward beside its backward (STE through both quantizers)
model.py     whole-model forward to the loss and backward to every parameter
optim.py     AdamW
schedule.py  the 2B4T report's two-stage learning-rate and weight-decay schedules
data.py      offline corpora, byte-level BPE tokenizer, train/validation split, batches
trainer.py   gradient accumulation, seeded resumable runs, checkpoints, export to the release layout
"""
