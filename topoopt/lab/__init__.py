"""The research harness beside the library: the command line, training runs and their
checkpoints, datasets, model builders, resumable sweeps, progress and the studies.

It uses the library (`topoopt`) as any user would; the library never imports it.
"""
