"""Training utilities: process groups and parallel wrappers (:mod:`onepeace.train.distributed`)."""
