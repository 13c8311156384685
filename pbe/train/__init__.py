"""Training Paint by Example: the paper's recipe (config), one training step (step), the loop (loop).

``pbe train`` (pbe.cli) runs ``pbe.train.loop.train(config)``; ``torchrun --nproc_per_node N -m pbe train ...`` spreads
it over processes (pbe.train.distributed).
"""
