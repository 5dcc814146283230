"""The training runtime (core layer): device and precision, the one ``TrainStep``, checkpoints,
torchrun process groups and the host allocator setting. The pretraining loop that drives them
for every method is ``mae_bench.methods.engine``."""
