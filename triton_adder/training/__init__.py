"""Training the zoo (`python -m triton_adder.train`): recipes, datasets, the loop, checkpoints, torchrun."""
