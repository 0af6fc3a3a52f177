"""The studies behind `experiments/` and the `topoopt` subcommands that run them.

Each module has a `main(argv)` taking the same options as its command; results go under
`experiments/results/<study>/` by default, and each study's findings are written up in
`experiments/RESULTS.md` with the command that produced them.
"""
